"""A request can hurt only itself (issue 27): every number is bounded where it is parsed, a step that
still raises fails only the requests that caused it, a dead engine thread never hangs a caller, /health
separates readiness (warmed up, alive, not draining) from liveness, and clients' null / no-op fields
are accepted while a real unknown value is still a 400 that names it.

The server is test_http's: the real uvicorn on loopback, a tiny random model, the byte tokenizer.
"""

import dataclasses
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_http import CFG, KEY, SERVE, TOK, serving, start_server, wait_for
from test_serve import params_of

from jaxllm.serve.engine import Engine
from jaxllm.serve.http import create_app
from jaxllm.serve.http.metrics import Metrics
from jaxllm.serve.http.server import GRACE_S, draining_server
from jaxllm.serve.sampling import SamplingParams
from jaxllm.serve.service import MAX_FAILED_STEPS, EngineDead, EngineService

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
GEN = "/generate"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def srv():
  with start_server() as s:
    yield s


def client(url, **kw):
  return httpx.Client(base_url=url, headers=AUTH, timeout=120, **kw)


def stream_completion(h, body) -> tuple[str, list, str]:
  """(text, token ids, finish reason) of a streamed /v1/completions request."""
  text, ids, finish = "", [], None
  with h.stream("POST", COMP, json={**body, "stream": True, "return_token_ids": True}) as r:
    assert r.status_code == 200, r.read()
    for line in r.iter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      assert "error" not in chunk, chunk
      c = chunk["choices"][0]
      text, ids, finish = text + c["text"], ids + (c.get("token_ids") or []), c["finish_reason"] or finish
  return text, ids, finish


def assert_openai_error(r, status, param):
  assert r.status_code == status, (r.status_code, r.text)
  err = r.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"], err
  assert err["param"] == param, err


# ---- must show: 8 streams through a storm of bad requests ---------------------------------------

# (what, path, body (dict, or raw bytes), param the 400 names). Every one is answered before it
# reaches the engine; none may disturb the streams.
HOSTILE = [
  ("top_k 2**31", COMP, {"prompt": "a", "top_k": 2**31}, "top_k"),
  ("top_k 2**63", CHAT, {"messages": USER, "top_k": 2**63}, "top_k"),
  ("seed 2**64", COMP, {"prompt": "a", "seed": 2**64}, "seed"),
  ("seed below int64", COMP, {"prompt": "a", "seed": -(2**63) - 1}, "seed"),
  ("max_tokens 2**31", COMP, {"prompt": "a", "max_tokens": 2**31}, "max_tokens"),
  ("max_tokens 10**30", CHAT, {"messages": USER, "max_tokens": 10**30}, "max_tokens"),
  ("max_tokens -1", COMP, {"prompt": "a", "max_tokens": -1}, "max_tokens"),
  ("n 10**9", COMP, {"prompt": "a", "n": 10**9}, "n"),
  ("min_tokens 2**31", COMP, {"prompt": "a", "max_tokens": 4, "min_tokens": 2**31}, "min_tokens"),
  ("logprobs 2**31", COMP, {"prompt": "a", "logprobs": 2**31}, "logprobs"),
  ("top_logprobs 10**6", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 10**6}, "top_logprobs"),
  ("logit_bias huge id", COMP, {"prompt": "a", "logit_bias": {"99999999999": 1}}, "logit_bias"),
  ("logit_bias 5000-digit id", COMP, {"prompt": "a", "logit_bias": {"1" * 5000: 1}}, "logit_bias"),
  ("logit_bias huge value", COMP, {"prompt": "a", "logit_bias": {"5": 1e308}}, "logit_bias"),
  ("logit_bias 301 entries", COMP, {"prompt": "a", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
  (
    "stop id 2**31",
    GEN,
    {"text": "a", "sampling_params": {"stop_token_ids": [2**31]}},
    "sampling_params.stop_token_ids",
  ),
  (
    "1000 stop ids",
    GEN,
    {"text": "a", "sampling_params": {"stop_token_ids": [1] * 1000}},
    "sampling_params.stop_token_ids",
  ),
  ("temperature 1e300", GEN, {"text": "a", "sampling_params": {"temperature": 1e300}}, "sampling_params.temperature"),
  (
    "sampling_seed 2**70",
    GEN,
    {"text": "a", "sampling_params": {"sampling_seed": 2**70}},
    "sampling_params.sampling_seed",
  ),
  ("repetition_penalty 0 in float32", COMP, {"prompt": "a", "repetition_penalty": 1e-50}, "repetition_penalty"),
  ("top_p infinite", COMP, b'{"prompt": "a", "top_p": 1e400}', "top_p"),
  ("temperature a string", COMP, {"prompt": "a", "temperature": "hot"}, "temperature"),
  ("prompt an object", COMP, {"prompt": {"text": "a"}}, "prompt"),
  ("token id 2**63", COMP, {"prompt": [2**63]}, "prompt"),
  ("lone surrogate prompt", COMP, b'{"prompt": "ab\\ud800cd"}', "prompt"),
  ("lone surrogate chat", CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
  ("lone surrogate key", COMP, b'{"prompt": "a", "\\ud800": 1}', None),
  ("deep nesting", COMP, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
  ("nesting past 64", COMP, b'{"prompt": "a", "user": ' + b"[" * 80 + b"]" * 80 + b"}", None),
  ("empty prompt", COMP, {"prompt": ""}, "prompt"),
  ("overlong prompt", COMP, {"prompt": "a" * 200}, "prompt"),
  ("no messages", CHAT, {"messages": []}, "messages"),
  ("unknown field", COMP, {"prompt": "a", "frobnicate": 1}, "frobnicate"),
  ("NaN", COMP, b'{"prompt": "a", "temperature": NaN}', None),
  ("bad JSON", COMP, b'{"prompt": "a",', None),
  ("stream a string", COMP, {"prompt": "a", "stream": "yes"}, "stream"),
]


# The largest values allowed: they reach the engine, run beside the streams, and must not disturb them.
EXTREME = [
  ("top_k 2**31-1", COMP, {"prompt": "a", "max_tokens": 8, "top_k": 2**31 - 1}),
  ("seed 2**63-1, n 3 (wraps)", COMP, {"prompt": "a", "max_tokens": 8, "seed": 2**63 - 1, "n": 3}),
  ("seed -2**63", CHAT, {"messages": USER, "max_tokens": 8, "seed": -(2**63), "temperature": 2}),
  ("float32 max temperature", GEN, {"text": "a", "sampling_params": {"max_new_tokens": 8, "temperature": 3.4e38}}),
  ("tiny top_p, min_p 1", COMP, {"prompt": "a", "max_tokens": 8, "top_p": 1e-9, "min_p": 1}),
  ("biases at +-100", COMP, {"prompt": "a", "max_tokens": 8, "logit_bias": {"65": 100, "66": -100}}),
  ("min_tokens = max_tokens", COMP, {"prompt": "a", "max_tokens": 8, "min_tokens": 8}),
]


def send(h, path, body):
  if isinstance(body, bytes):
    return h.post(path, content=body, headers={"Content-Type": "application/json"})
  return h.post(path, json=body)


def test_streams_survive_a_storm_of_bad_requests(srv):
  prompts = [f"Stream {i}: once upon a time" for i in range(8)]
  body = lambda p: {"prompt": p, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
  with client(srv.url) as h:
    alone = [stream_completion(h, body(p)) for p in prompts]  # each one alone on the server
  assert all(len(ids) == 64 and finish == "length" for _, ids, finish in alone)

  started = threading.Barrier(len(prompts) + 1)
  finished_at = []

  def stream(p):
    with client(srv.url) as h:
      seen = False
      with h.stream("POST", COMP, json={**body(p), "stream": True, "return_token_ids": True}) as r:
        text, ids, finish = "", [], None
        for line in r.iter_lines():
          if not line.startswith("data: ") or line == "data: [DONE]":
            continue
          if not seen:
            seen = True
            started.wait(timeout=60)  # every stream runs before the storm starts
          c = json.loads(line[6:])["choices"][0]
          text, ids, finish = text + c["text"], ids + (c.get("token_ids") or []), c["finish_reason"] or finish
        out = (text, ids, finish)
      finished_at.append(time.perf_counter())
      return out

  def hostile(case):
    with client(srv.url) as h:
      return case, send(h, case[1], case[2]), time.perf_counter()

  with ThreadPoolExecutor(len(prompts)) as streams, ThreadPoolExecutor(4) as storm:
    futures = [streams.submit(stream, p) for p in prompts]
    started.wait(timeout=60)
    answers = list(storm.map(hostile, HOSTILE + EXTREME))
    results = [f.result(timeout=120) for f in futures]

  assert results == alone  # text, token ids and finish reason, exactly as alone
  for case, r, _ in answers[: len(HOSTILE)]:
    what, _, _, param = case
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
    assert_openai_error(r, r.status_code, param)
  for (what, *_), r, _ in answers[len(HOSTILE) :]:
    assert r.status_code == 200, (what, r.text)
  assert min(t for _, _, t in answers) < max(finished_at), "the storm must overlap the streams"
  with client(srv.url) as h:
    assert h.get("/health").status_code == 200
  assert srv.service.snapshot()["finished"].get("error", 0) == 0 and srv.service.step_failures == 0


# ---- bounds in SamplingParams -----------------------------------------------------------------


@pytest.mark.parametrize(
  "field,value",
  [
    ("top_k", 2**31),
    ("max_tokens", 2**31),
    ("seed", 2**64),
    ("temperature", 1e39),
    ("repetition_penalty", 1e-50),
    ("stop_token_ids", (2**31,)),
    ("stop_token_ids", tuple(range(257))),
    ("logit_bias", {2**31: 1.0}),
  ],
)
def test_sampling_params_bound_every_number(field, value):
  """Whoever builds SamplingParams (HTTP, RL, offline) cannot overflow the sampler's arrays."""
  with pytest.raises(ValueError, match=f"invalid {field}="):
    SamplingParams(**{field: value})


# ---- a failing step fails only its request -----------------------------------------------------


def run_requests(service, prompts, sps, timeout=60):
  """Submit every (prompt, sp); -> per request (token ids, finish reason, error)."""
  done = [threading.Event() for _ in prompts]
  out = [([], None, "") for _ in prompts]

  def on_event(i, ev):
    ids, _, _ = out[i]
    out[i] = (ids + ev.token_ids, ev.finish_reason, ev.error)
    if ev.finish_reason:
      done[i].set()

  for i, (p, sp) in enumerate(zip(prompts, sps)):
    service.submit(p, sp, lambda ev, i=i: on_event(i, ev))
  for d in done:
    assert d.wait(timeout), "a request never finished"
  return out


def poisoned(sp: SamplingParams, **fields) -> SamplingParams:
  """sp with values no validation would let through (a bug elsewhere, or a future field)."""
  for k, v in fields.items():
    object.__setattr__(sp, k, v)
  return sp


@pytest.fixture(scope="module")
def solo():
  """Greedy outputs of each request alone (offline engine, prefix cache off)."""
  eng = Engine(CFG, params_of(CFG), dataclasses.replace(SERVE, radix=False), detokenize=TOK.decode)
  return lambda p, n: eng.generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[0].output


def test_failing_step_fails_only_the_request_that_caused_it(solo):
  """top_k = 2**31 (what protocol.py let through before) overflows the int32 sampling array inside
  Engine.step(): only that request fails; the 5 beside it produce what they produce alone."""
  engine = Engine(CFG, params_of(CFG), SERVE, detokenize=TOK.decode)
  service = EngineService(engine).start()
  try:
    prompts = [TOK.encode(f"request {i} of the batch") for i in range(6)]
    sps = [SamplingParams(max_tokens=20, ignore_eos=True) for _ in prompts]
    sps[3] = poisoned(SamplingParams(max_tokens=20, ignore_eos=True, seed=1), top_k=2**31)
    out = run_requests(service, prompts, sps)
    assert out[3][1] == "error" and "OverflowError" in out[3][2]
    for i in (0, 1, 2, 4, 5):
      assert out[i] == (solo(prompts[i], 20), "length", ""), i
    stats = service.snapshot()
    assert stats["finished"]["error"] == 1 and "abort" not in stats["finished"] and stats["step_failures"] >= 1
    metrics = Metrics(service).render().decode()
    assert 'jaxllm:request_success_total{finished_reason="error"} 1.0' in metrics
    assert "jaxllm:engine_step_failures_total" in metrics
    # A request that joins a running batch and breaks it mid-decode: the same.
    sps = [SamplingParams(max_tokens=20, ignore_eos=True) for _ in range(3)]
    late = poisoned(SamplingParams(max_tokens=20, ignore_eos=True, seed=1), top_k=2**40)
    results = []
    first = threading.Thread(target=lambda: results.append(run_requests(service, prompts[:3], sps)))
    first.start()
    wait_for(lambda: engine.sched.running)
    assert run_requests(service, [prompts[4]], [late])[0][1] == "error"
    first.join(60)
    assert results[0] == [(solo(p, 20), "length", "") for p in prompts[:3]]
    assert not service.stopped
    engine.sched.check()
  finally:
    service.close()


def test_add_request_and_finish_hook_failures_fail_only_their_request(solo):
  engine = Engine(CFG, params_of(CFG), SERVE, detokenize=TOK.decode)
  add = engine.add_request

  def add_request(prompt, sp, arrival=None, **kw):  # a queueing bug hit by one request
    if sp.seed == 666:
      raise RuntimeError("cannot queue this one")
    return add(prompt, sp, arrival=arrival, **kw)

  engine.add_request = add_request
  service = EngineService(engine)

  def hook(req, timings):  # e.g. an RL consumer that cannot take this rollout
    if req.sp.seed == 777:
      raise KeyError("rollout buffer full")

  service.add_finish_hook(hook)
  service.start()
  try:
    prompts = [TOK.encode(f"hooked {i}") for i in range(4)]
    sps = [SamplingParams(max_tokens=12, ignore_eos=True, seed=s) for s in (1, 666, 777, 2)]
    out = run_requests(service, prompts, sps)
    assert out[1] == ([], "error", "RuntimeError: cannot queue this one")
    assert out[2][1] == "error" and "rollout buffer full" in out[2][2]
    assert out[0] == (solo(prompts[0], 12), "length", "") and out[3] == (solo(prompts[3], 12), "length", "")
    assert not service.stopped
  finally:
    service.close()


def test_a_step_that_always_fails_is_the_engines_fault():
  """Every step raises whoever runs in it (a broken device): after MAX_FAILED_STEPS in a row the engine
  stops, every request gets an error, and nothing new is taken."""
  engine = Engine(CFG, params_of(CFG), SERVE, detokenize=TOK.decode)

  def broken():
    raise RuntimeError("device lost")

  engine.step = broken
  service = EngineService(engine).start()
  prompts = [TOK.encode(f"doomed {i}") for i in range(6)]  # isolating them takes 1 + 2 * 6 - 2 > 8 steps
  out = run_requests(service, prompts, [SamplingParams(max_tokens=4) for _ in prompts])
  assert all(finish == "error" and "device lost" in error for _, finish, error in out)
  wait_for(lambda: service.stopped)
  assert f"{MAX_FAILED_STEPS} steps in a row failed" in service.dead
  assert service.step_failures == MAX_FAILED_STEPS
  with pytest.raises(EngineDead):
    service.submit(prompts[0], SamplingParams(max_tokens=4), print)


# ---- a dead engine thread ------------------------------------------------------------------------


def test_dead_engine_thread_fails_pending_and_answers_503():
  with start_server() as s, client(s.url) as h:
    assert h.get("/health").status_code == 200

    def die():
      raise SystemExit("the device is gone")  # not an Exception: the loop cannot go on

    s.engine.step = die
    r = h.post(COMP, json={"prompt": "a", "max_tokens": 4})
    assert r.status_code == 500 and "the device is gone" in r.json()["error"]["message"]  # its request ends
    wait_for(lambda: s.service.stopped)
    for path in ("/health", "/health/ready", "/health/live"):
      assert_openai_error(h.get(path), 503, None)
      assert h.get(path).json()["error"]["code"] == "engine_dead"
    r = h.post(COMP, json={"prompt": "a", "max_tokens": 4})
    assert_openai_error(r, 503, None)
    assert r.json()["error"]["code"] == "engine_dead"
    assert h.post("/flush_cache").status_code == 503
    t0 = time.perf_counter()
    with pytest.raises(EngineDead):
      s.service.set_weights(s.engine.params, "v2")
    assert time.perf_counter() - t0 < 1


def test_requests_queued_when_the_thread_dies_get_an_error():
  engine = Engine(CFG, params_of(CFG), SERVE, detokenize=TOK.decode)
  service = EngineService(engine)  # not started: requests stay in the inbox
  events = []
  for text in ("first", "second"):
    service.submit(TOK.encode(text), SamplingParams(max_tokens=4), events.append)

  def die(cmd):
    raise SystemExit("gone")

  service._apply = die  # the thread dies while it takes the first request from its inbox
  service.start()
  wait_for(lambda: len(events) == 2)
  assert [(ev.rid, ev.finish_reason) for ev in events] == [(0, "error"), (1, "error")]
  assert all("gone" in ev.error for ev in events)
  with pytest.raises(EngineDead):
    service.submit(TOK.encode("late"), SamplingParams(max_tokens=4), events.append)


# ---- readiness ---------------------------------------------------------------------------------------


def test_not_ready_before_warmup_and_while_draining():
  sc = dataclasses.replace(SERVE, api_key="")
  engine = Engine(CFG, params_of(CFG), sc, detokenize=TOK.decode)
  service = EngineService(engine)  # not started: the warm-up create_app queued has not run
  app = create_app(service, TOK, "m", sc, None)
  server = draining_server(app, service, drain_timeout_s=30, log_level="warning", lifespan="off")
  try:
    with serving(app, server) as url, httpx.Client(base_url=url, timeout=60) as h:
      r = h.get("/health")
      assert_openai_error(r, 503, None)
      assert r.json()["error"]["code"] == "warming_up" and h.get("/health/live").status_code == 200
      with ThreadPoolExecutor(1) as pool:  # a request before readiness waits behind the warm-up
        early = pool.submit(h.post, COMP, json={"prompt": "a", "max_tokens": 4, "temperature": 0})
        service.start()
        wait_for(lambda: h.get("/health").status_code == 200, timeout=120)
        assert service.warmed_up and early.result().status_code == 200
      # SIGTERM: readiness 503 and new requests refused while a running stream finishes.
      body = {"prompt": "b", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
      with h.stream("POST", COMP, json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        server.handle_exit(signal.SIGTERM, None)
        assert h.get("/health").json()["error"]["code"] == "draining"
        assert h.get("/health/live").status_code == 200
        refused = h.post(COMP, json={"prompt": "a", "max_tokens": 4})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        rest = [line for line in lines if line.startswith("data: ")]
      assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
      wait_for(lambda: server.should_exit, timeout=30)
  finally:
    service.close()


def test_drain_ends_after_its_timeout():
  sc = dataclasses.replace(SERVE, api_key="")
  service = EngineService(Engine(CFG, params_of(CFG), sc, detokenize=TOK.decode))  # never started: nothing ends
  app = create_app(service, TOK, "m", sc, None, warmup=False)
  server = draining_server(app, service, drain_timeout_s=0.5, log_level="warning", lifespan="off")
  with serving(app, server) as url, httpx.Client(base_url=url, timeout=60) as h, ThreadPoolExecutor(1) as pool:
    assert h.get("/health").status_code == 200  # warmup=False: ready at once
    stuck = pool.submit(h.post, COMP, json={"prompt": "a", "max_tokens": 4})
    wait_for(lambda: service.busy)
    t0 = time.perf_counter()
    server.handle_exit(signal.SIGTERM, None)
    wait_for(lambda: server.should_exit, timeout=10)
    assert 0.4 < time.perf_counter() - t0 < 0.5 + 1
    r = stuck.result(timeout=GRACE_S + 10)  # ended by the drain, in OpenAI's shape
    assert_openai_error(r, 500, None)
    assert "drain_timeout_s=0.5" in r.json()["error"]["message"]


# ---- leniency ------------------------------------------------------------------------------------


def test_null_and_noop_fields_are_accepted(srv):
  base = {"prompt": "Once upon", "max_tokens": 8, "temperature": 0}
  with client(srv.url) as h:
    want = h.post(COMP, json=base).json()["choices"][0]["text"]
    for extra in (
      {"echo": False, "best_of": 1, "suffix": None, "user": "u-1", "logprobs": None},
      {"logprobs": False, "stream_options": None, "tools": None, "seed": None, "stop": None},
      {"suffix": "", "n": 1, "store": False},
    ):
      r = h.post(COMP, json={**base, **extra})
      assert r.status_code == 200, (extra, r.text)
      assert r.json()["choices"][0]["text"] == want
    chat = {"messages": USER, "max_tokens": 4, "temperature": 0}
    want = h.post(CHAT, json=chat).json()["choices"][0]["message"]["content"]
    for extra in (
      {"tools": None, "tool_choice": None, "response_format": {"type": "text"}, "logprobs": None},
      {"tools": [], "tool_choice": "none", "parallel_tool_calls": False, "modalities": ["text"]},
      {"tool_choice": "auto", "user": "u-2", "functions": None},
    ):
      r = h.post(CHAT, json={**chat, **extra})
      assert r.status_code == 200, (extra, r.text)
      assert r.json()["choices"][0]["message"]["content"] == want
    call = {"id": "call_1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
    history = [  # short: the default template renders the tool call too, in a 128-token context
      {"role": "user", "content": "t?", "name": "a"},
      {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]},
      {"role": "tool", "content": "12", "tool_call_id": "call_1"},
      {"role": "assistant", "content": "N", "refusal": None, "tool_calls": [], "function_call": None},
    ]
    r = h.post(CHAT, json={"messages": history, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
  "path,extra,param,code",
  [
    (COMP, {"frobnicate": 1}, "frobnicate", "unsupported_field"),
    (COMP, {"frobnicate": False}, "frobnicate", "unsupported_field"),  # false is a value too
    (COMP, {"best_of": 3}, "best_of", "unsupported_value"),
    (COMP, {"suffix": "the end"}, "suffix", "unsupported_value"),
    (CHAT, {"messages": [{"role": "user", "content": "a", "frobnicate": "x"}]}, "messages[0].frobnicate", None),
    (CHAT, {"messages": [{"role": "assistant", "content": "a", "tool_calls": "x"}]}, "messages[0].tool_calls", None),
    (GEN, {"sampling_params": {"beam_width": 2}}, "sampling_params.beam_width", "unsupported_field"),
  ],
)
def test_unknown_field_with_a_value_names_it(srv, path, extra, param, code):
  body = {COMP: {"prompt": "a"}, CHAT: {"messages": USER}, GEN: {"text": "a"}}[path]
  with client(srv.url) as h:
    r = h.post(path, json={**body, **extra})
  assert_openai_error(r, 400, param)
  assert code is None or r.json()["error"]["code"] == code
