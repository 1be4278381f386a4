"""The HTTP server end to end: the real uvicorn server on loopback in a background thread, a tiny
model with the byte tokenizer, driven by the official `openai` client and by raw httpx.

Reference for every greedy output: the offline engine (`Engine.generate`) with the prefix cache off.
"""

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from test_serve import DENSE, params_of

import serve
from jaxllm.config import ServeConfig
from jaxllm.data import load_tokenizer
from jaxllm.model.params import init_params
from jaxllm.serve.engine import Engine
from jaxllm.serve.http import create_app
from jaxllm.serve.http.chat import ChatTemplate
from jaxllm.serve.sampling import SamplingParams
from jaxllm.serve.service import EngineService

# The byte tokenizer's ids go up to 258 (eos 257): the model's vocabulary must hold them.
CFG = dataclasses.replace(DENSE, vocab_size=384, max_seq_len=128)
KEY = "test-key"
MODEL = "tiny-test"
# One bucket per dimension (16 sequences, 64 tokens, 16 pages = max_seq_len): 3 compiles in all.
SERVE = ServeConfig(
  page_size=8,
  num_pages=160,
  max_running=16,
  chunk_size=48,
  min_seqs=16,
  min_tokens=64,
  api_key=KEY,
  max_n=8,
  max_body_bytes=16_384,
  max_waiting=256,
)
TOK = load_tokenizer("byte")
EOS = (TOK.eos_id,)


# ---- the server ---------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(app, server=None):
  """Run `app` (or the uvicorn.Server `server` of it) on a free loopback port in a background thread;
  yields its base URL."""
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  if server is None:
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started:
    assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()


@dataclasses.dataclass
class Server:
  url: str
  service: EngineService
  engine: Engine

  def client(self, **kw):
    return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120, **kw)

  def http(self):
    return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def start_server(cfg=CFG, serve_cfg=SERVE, model=MODEL):
  """(context manager) a started service + app + uvicorn; closed on exit."""

  @contextlib.contextmanager
  def run():
    engine = Engine(cfg, params_of(cfg), serve_cfg, tokenizer=TOK)  # its decode detokenizes; grammars
    service = EngineService(engine, max_waiting=serve_cfg.max_waiting).start()
    try:
      with serving(create_app(service, TOK, model, serve_cfg, None)) as url:
        wait_for(lambda: service.warmed_up, timeout=300)  # ready: /health is 200 from here on
        yield Server(url, service, engine)
    finally:
      service.close()

  return run()


@pytest.fixture(scope="module")
def srv():
  with start_server() as s:
    yield s


@pytest.fixture(scope="module")
def offline():
  """Greedy reference: the offline engine, prefix cache off (same buckets: no new compiles)."""
  eng = Engine(CFG, params_of(CFG), dataclasses.replace(SERVE, radix=False), detokenize=TOK.decode)

  def generate(prompt_ids, max_tokens, **kw):
    r = eng.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, stop_token_ids=EOS, **kw))[0]
    return r.output, TOK.decode(r.output)

  return generate


PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "def main():\n    return"]


def wait_for(cond, timeout=30.0):
  deadline = time.time() + timeout
  while not cond():
    assert time.time() < deadline, "condition not reached in time"
    time.sleep(0.02)


def snapshot_idle(srv):
  wait_for(lambda: (s := srv.service.snapshot())["running"] == 0 and s["waiting"] == 0 and s["inbox"] == 0)


# ---- OpenAI client --------------------------------------------------------------------------------


def test_completions_greedy_equal_offline_engine(srv, offline):
  client = srv.client()
  for prompt in PROMPTS:
    r = client.completions.create(
      model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    want_ids, want_text = offline(TOK.encode(prompt), 12)
    c = r.choices[0]
    assert c.text == want_text and c.token_ids == want_ids and c.prompt_token_ids == TOK.encode(prompt)
    assert c.finish_reason == ("stop" if want_ids[-1] == TOK.eos_id else "length")
    assert r.usage.prompt_tokens == len(TOK.encode(prompt)) and r.usage.completion_tokens == len(want_ids)
    assert r.usage.prompt_tokens_details.cached_tokens is not None
    assert c.weight_version == 0
  # A token-id prompt and a list holding one prompt are the same request.
  ids = TOK.encode(PROMPTS[1])
  for form in (ids, [ids], [PROMPTS[1]]):
    r = client.completions.create(model=MODEL, prompt=form, max_tokens=12, temperature=0)
    assert r.choices[0].text == offline(ids, 12)[1]


def test_chat_uses_template_and_equals_offline_engine(srv, offline):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
  prompt = ChatTemplate(None, TOK).encode(messages)
  assert TOK.decode(prompt) == "system: Be brief.\nuser: Hello there\nassistant:"
  r = srv.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
  assert r.choices[0].message.role == "assistant"
  assert r.choices[0].message.content == offline(prompt, 10)[1]
  assert r.usage.prompt_tokens == len(prompt)
  # Without max_tokens, chat may fill the context (the random model rarely samples EOS).
  r = srv.client().chat.completions.create(model=MODEL, messages=messages, temperature=0)
  assert r.usage.prompt_tokens + r.usage.completion_tokens <= CFG.max_seq_len


def test_streaming_deltas_concatenate_to_non_streamed(srv):
  client = srv.client()
  for prompt in PROMPTS:
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    chunks = list(
      client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
      )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens is not None
  messages = [{"role": "user", "content": PROMPTS[0]}]
  whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
  chunks = list(
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)
  )
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
  assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_n_samples_with_seed_distinct_and_reproducible(srv):
  client = srv.client()
  ask = lambda **kw: client.completions.create(
    model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=1.0, n=4, **kw
  )
  r = ask(seed=7)
  texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
  assert len(set(texts)) == 4  # seeds 7, 8, 9, 10
  assert [c.text for c in sorted(ask(seed=7).choices, key=lambda c: c.index)] == texts
  assert r.usage.prompt_tokens == len(TOK.encode(PROMPTS[0]))  # the prompt counts once
  assert r.usage.completion_tokens == 4 * 12 or any(c.finish_reason == "stop" for c in r.choices)
  assert len({c.text for c in ask().choices}) > 1  # no seed: random seeds, still distinct
  # Streamed n > 1: each choice's deltas concatenate to its text.
  chunks = list(
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=1.0, n=4, seed=7, stream=True)
  )
  assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(4)] == texts


def test_stop_strings_never_leak_into_deltas(srv, offline):
  client = srv.client()
  prompt = PROMPTS[0]
  ids, text = offline(TOK.encode(prompt), 40)
  # A stop string from the middle of the greedy output: printable (whole characters) and first
  # occurring there, so the output is cut right before it.
  start = next(i for i in range(3, len(text) - 3) if text[i : i + 2].isprintable() and text.index(text[i : i + 2]) == i)
  stop = text[start : start + 2]
  want = text[:start]
  deltas = [
    c.choices[0].text
    for c in client.completions.create(
      model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "never-appears"], stream=True
    )
  ]
  assert "".join(deltas) == want and stop not in "".join(deltas)
  whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop)
  assert whole.choices[0].text == want and whole.choices[0].finish_reason == "stop"


def test_logprobs_streamed_match_non_streamed(srv):
  client = srv.client()
  kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0, logprobs=0)
  whole = client.completions.create(**kw)
  lp = whole.choices[0].logprobs
  assert len(lp.token_logprobs) == len(lp.tokens) == whole.usage.completion_tokens
  assert all(x <= 0 for x in lp.token_logprobs) and lp.text_offset[0] == 0
  streamed = [
    x
    for c in client.completions.create(**kw, stream=True)
    if c.choices[0].logprobs
    for x in c.choices[0].logprobs.token_logprobs
  ]
  assert streamed == pytest.approx(lp.token_logprobs, abs=1e-5)

  messages = [{"role": "user", "content": PROMPTS[2]}]
  kw = dict(model=MODEL, messages=messages, max_tokens=16, temperature=0, logprobs=True)
  whole = client.chat.completions.create(**kw)
  content = whole.choices[0].logprobs.content
  assert len(content) == whole.usage.completion_tokens
  streamed = [
    x.logprob
    for c in client.chat.completions.create(**kw, stream=True)
    if c.choices and c.choices[0].logprobs
    for x in c.choices[0].logprobs.content
  ]
  assert streamed == pytest.approx([x.logprob for x in content], abs=1e-5)
  r = client.chat.completions.create(**kw, top_logprobs=3)
  for x in r.choices[0].logprobs.content:  # greedy: the sampled token is the likeliest
    assert len(x.top_logprobs) == 3 and x.top_logprobs[0].logprob == pytest.approx(x.logprob, abs=1e-5)
    assert x.top_logprobs[0].logprob >= x.top_logprobs[1].logprob >= x.top_logprobs[2].logprob
  r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=4, temperature=0, logprobs=2)
  lp = r.choices[0].logprobs
  # Legacy format: {token text: logprob}; two ids with the same text (U+FFFD) share an entry.
  for alts, sampled in zip(lp.top_logprobs, lp.token_logprobs):
    assert 1 <= len(alts) <= 2 and max(alts.values()) == pytest.approx(sampled, abs=1e-5)


def test_logit_bias_and_ignore_eos_reach_the_sampler(srv):
  client = srv.client()
  ask = lambda bias, **kw: client.completions.create(
    model=MODEL,
    prompt=PROMPTS[0],
    max_tokens=6,
    temperature=0,
    logit_bias=bias,
    extra_body={"return_token_ids": True, **kw},
  )
  assert ask({"65": 100}).choices[0].text == "AAAAAA"
  eos = {str(TOK.eos_id): 100}  # EOS forced: the tokenizer's EOS stops the request...
  c = ask(eos).choices[0]
  assert c.token_ids == [TOK.eos_id] and c.finish_reason == "stop" and c.text == ""
  c = ask(eos, ignore_eos=True).choices[0]  # ...unless ignore_eos
  assert c.token_ids == [TOK.eos_id] * 6 and c.finish_reason == "length"


def test_cached_tokens_rise_on_repeated_prefix(srv):
  client = srv.client()
  system = "You are a helpful assistant that answers in one line. "  # 54 tokens: 6 whole pages
  first = client.completions.create(model=MODEL, prompt=system + "Q1", max_tokens=2, temperature=0)
  second = client.completions.create(model=MODEL, prompt=system + "Q2", max_tokens=2, temperature=0)
  c1 = first.usage.prompt_tokens_details.cached_tokens
  c2 = second.usage.prompt_tokens_details.cached_tokens
  assert c2 > c1 and c2 >= 48


def test_models_health_flush(srv):
  models = srv.client().models.list()
  assert [m.id for m in models.data] == [MODEL]
  with srv.http() as h:
    assert h.get("/health").json() == {"status": "ok"}
    snapshot_idle(srv)
    r = h.post("/flush_cache")
    assert r.status_code == 200 and r.json() == {"flushed": True}


# ---- native /generate -------------------------------------------------------------------------


def test_generate_native_token_ids(srv, offline):
  ids = TOK.encode(PROMPTS[0])
  want_ids, want_text = offline(ids, 10)
  with srv.http() as h:
    r = h.post(
      "/generate",
      json={"input_ids": ids, "sampling_params": {"max_new_tokens": 10, "temperature": 0}, "return_logprob": True},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["output_ids"] == want_ids and out["text"] == want_text
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == len(want_ids)
    assert meta["finish_reason"]["type"] in ("stop", "length") and meta["weight_version"] == 0
    assert "cached_tokens" in meta and [t for _, t, _ in meta["output_token_logprobs"]] == want_ids
    # text in, streamed: cumulative chunks, the last one equals the whole answer
    with h.stream(
      "POST",
      "/generate",
      json={"text": PROMPTS[0], "stream": True, "sampling_params": {"max_new_tokens": 10, "temperature": 0}},
    ) as s:
      lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["output_ids"] == want_ids and last["text"] == want_text


def test_weight_swap_reaches_the_api(srv):
  """RL: after set_weights, outputs come from the new weights and name their version."""
  ids = TOK.encode(PROMPTS[0])
  old, new = srv.engine.params, init_params(CFG, 1)
  want = (
    Engine(CFG, new, dataclasses.replace(SERVE, radix=False), detokenize=TOK.decode)
    .generate([ids], SamplingParams(max_tokens=8, stop_token_ids=EOS))[0]
    .output
  )
  srv.service.set_weights(new, "step-1")
  try:
    with srv.http() as h:
      out = h.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert out.json()["output_ids"] == want and out.json()["meta_info"]["weight_version"] == "step-1"
    r = srv.client().completions.create(
      model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
    )
    assert r.choices[0].token_ids == want and r.choices[0].weight_version == "step-1"
  finally:
    srv.service.set_weights(old, 0)  # the original weights under their own version (its cache stays valid)


# ---- errors ----------------------------------------------------------------------------------------

BAD = [
  # (what, method/path, body or raw bytes, extra headers, status, param)
  ("malformed json", "/v1/completions", b'{"prompt": "a", ', {}, 400, None),
  ("body not an object", "/v1/completions", b"[1, 2]", {}, 400, None),
  ("missing prompt", "/v1/completions", {"model": MODEL}, {}, 400, "prompt"),
  ("empty prompt", "/v1/completions", {"prompt": ""}, {}, 400, "prompt"),
  ("empty token prompt", "/v1/completions", {"prompt": []}, {}, 400, "prompt"),
  ("mixed batch", "/v1/completions", {"prompt": ["a", [97]]}, {}, 400, "prompt"),
  ("empty prompt in a batch", "/v1/completions", {"prompt": ["a", ""]}, {}, 400, "prompt[1]"),
  ("token id out of range", "/v1/completions", {"prompt": [1, 2, 999]}, {}, 400, "prompt"),
  ("negative token id", "/generate", {"input_ids": [-1]}, {}, 400, "input_ids"),
  ("over the context", "/v1/completions", {"prompt": "a" * 100, "max_tokens": 40}, {}, 400, "max_tokens"),
  (
    "prompt fills the context",
    "/v1/chat/completions",
    {"messages": [{"role": "user", "content": "a" * 200}]},
    {},
    400,
    "messages",
  ),
  (
    "both lengths, disagreeing",
    "/v1/chat/completions",
    {"messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "max_completion_tokens": 4},
    {},
    400,
    "max_tokens",
  ),
  ("seed a string", "/v1/completions", {"prompt": "a", "seed": "7"}, {}, 400, "seed"),
  (
    "image content",
    "/v1/chat/completions",
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {},
    400,
    "messages[0].content[0].type",
  ),
  ("text and input_ids", "/generate", {"text": "a", "input_ids": [1]}, {}, 400, "text"),
  ("temperature too high", "/v1/completions", {"prompt": "a", "temperature": 2.5}, {}, 400, "temperature"),
  ("temperature a string", "/v1/completions", {"prompt": "a", "temperature": "hot"}, {}, 400, "temperature"),
  ("top_p zero", "/v1/completions", {"prompt": "a", "top_p": 0}, {}, 400, "top_p"),
  ("top_k negative", "/v1/completions", {"prompt": "a", "top_k": -5}, {}, 400, "top_k"),
  ("top_k float", "/v1/completions", {"prompt": "a", "top_k": 1.5}, {}, 400, "top_k"),
  ("n zero", "/v1/completions", {"prompt": "a", "n": 0}, {}, 400, "n"),
  ("n over max_n", "/v1/completions", {"prompt": "a", "n": 9}, {}, 400, "n"),
  ("n a bool", "/v1/completions", {"prompt": "a", "n": True}, {}, 400, "n"),
  ("max_tokens zero", "/v1/completions", {"prompt": "a", "max_tokens": 0}, {}, 400, "max_tokens"),
  ("five stops", "/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "stop"),
  ("logprobs over 5", "/v1/completions", {"prompt": "a", "logprobs": 6}, {}, 400, "logprobs"),
  (
    "top_logprobs without logprobs",
    "/v1/chat/completions",
    {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
    {},
    400,
    "top_logprobs",
  ),
  ("logit_bias id out of range", "/v1/completions", {"prompt": "a", "logit_bias": {"9999": 1}}, {}, 400, "logit_bias"),
  ("presence_penalty", "/v1/completions", {"prompt": "a", "presence_penalty": 3}, {}, 400, "presence_penalty"),
  ("unknown field", "/v1/completions", {"prompt": "a", "suffix": "b"}, {}, 400, "suffix"),
  (
    "unknown chat field",
    "/v1/chat/completions",
    {"messages": [{"role": "user", "content": "a"}], "modalities": ["audio"]},
    {},
    400,
    "modalities",
  ),
  (
    "unknown chat field with a value",
    "/v1/chat/completions",
    {"messages": [{"role": "user", "content": "a"}], "audio": {"voice": "alloy"}},
    {},
    400,
    "audio",
  ),
  ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "a"}]}, {}, 400, "messages[0].role"),
  (
    "stream_options without stream",
    "/v1/completions",
    {"prompt": "a", "stream_options": {"include_usage": True}},
    {},
    400,
    "stream_options",
  ),
  ("sampling_params not an object", "/generate", {"text": "a", "sampling_params": []}, {}, 400, "sampling_params"),
  (
    "unknown sampling param",
    "/generate",
    {"text": "a", "sampling_params": {"beam_width": 2}},
    {},
    400,
    "sampling_params.beam_width",
  ),
  ("unknown model", "/v1/completions", {"model": "gpt-17", "prompt": "a"}, {}, 404, "model"),
  ("body too large", "/v1/completions", {"prompt": "a" * 20_000}, {}, 413, None),
  ("wrong key", "/v1/completions", {"prompt": "a"}, {"Authorization": "Bearer nope"}, 401, None),
  ("no key", "/v1/models", None, {"Authorization": ""}, 401, None),
  ("no route", "/v2/completions", {"prompt": "a"}, {}, 404, None),
]


@pytest.mark.parametrize("what,path,body,headers,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_and_server_stays_up(srv, what, path, body, headers, status, param):
  with srv.http() as h:
    if body is None:
      r = h.get(path, headers=headers)
    elif isinstance(body, bytes):
      r = h.post(path, content=body, headers={"Content-Type": "application/json", **headers})
    else:
      r = h.post(path, json=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    assert h.get("/health").status_code == 200


def test_chunked_body_over_limit_is_413(srv):
  """No Content-Length (chunked upload): the bytes actually read are counted."""

  def chunks():
    yield b'{"prompt": "'
    for _ in range(40):
      yield b"a" * 1000
    yield b'"}'

  with srv.http() as h:
    r = h.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert h.get("/health").status_code == 200


def test_queue_full_503_and_hang_up_while_queued():
  """A service whose engine thread never runs keeps everything queued: a non-streamed client that
  gives up gets its request aborted, and a request over max_waiting=2 is refused, deterministically."""
  sc = dataclasses.replace(SERVE, max_waiting=2, api_key="")
  engine = Engine(CFG, params_of(CFG), sc, detokenize=TOK.decode)
  service = EngineService(engine, max_waiting=2)  # not started
  aborted = []
  service.abort = aborted.append  # record what the server aborts
  with serving(create_app(service, TOK, MODEL, sc, None)) as url, httpx.Client(base_url=url, timeout=300) as h:
    with pytest.raises(httpx.ReadTimeout):
      h.post("/v1/completions", json={"prompt": "a"}, timeout=0.5)
    wait_for(lambda: aborted == [0], timeout=10)  # the hang-up aborted request 0
    r = h.post("/v1/completions", json={"prompt": "a", "n": 3})  # one slot left: the second sample is refused
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "queue_full"
    assert aborted == [0, 1]  # all or nothing: its first sample is withdrawn
    assert h.get("/health/live").status_code == 200  # alive; not ready (never warmed up)


# ---- metrics and disconnects -------------------------------------------------------------------


def scrape(h) -> dict:
  """{sample name (+ labels): value} of /metrics."""
  r = h.get("/metrics")
  assert r.status_code == 200
  out = {}
  for fam in text_string_to_metric_families(r.text):
    for s in fam.samples:
      key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
      out[key] = s.value
  return out


def test_metrics_counters_equal_usage_sums(srv):
  client = srv.client()
  with srv.http() as h:
    snapshot_idle(srv)
    before = scrape(h)
    usages = [
      client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).usage for p in PROMPTS + PROMPTS
    ]
    usages += [
      client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=5, temperature=0
      ).usage
      for p in PROMPTS
    ]
    after = scrape(h)
  delta = lambda k: after[k] - before.get(k, 0)
  assert delta("jaxllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
  assert delta("jaxllm:generation_tokens_total") == sum(u.completion_tokens for u in usages)
  assert delta("jaxllm:cached_prompt_tokens_total") == sum(u.prompt_tokens_details.cached_tokens for u in usages)
  assert delta("jaxllm:cached_prompt_tokens_total") > 0  # PROMPTS repeated: the second round hits
  finished = sum(delta(k) for k in after if k.startswith("jaxllm:request_success_total"))
  assert finished == len(usages)
  assert delta("jaxllm:e2e_request_latency_seconds_count") == len(usages)
  assert delta("jaxllm:time_to_first_token_seconds_count") == len(usages)
  for gauge in ("jaxllm:num_requests_running", "jaxllm:num_requests_waiting", "jaxllm:kv_pages_used"):
    assert gauge in after
  assert after["jaxllm:num_requests_running"] == 0


def test_client_disconnect_mid_stream_aborts(srv):
  aborted = lambda: srv.service.snapshot()["finished"].get("abort", 0)
  before = aborted()

  async def go():
    async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
      body = {"prompt": "x", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
      async with h.stream("POST", "/v1/completions", json=body) as r:
        got = 0
        async for line in r.aiter_lines():
          got += line.startswith("data: ")
          if got == 2:
            break  # leaving the block closes the connection

  gen0 = srv.service.snapshot()["generated_tokens"]
  asyncio.run(go())
  wait_for(lambda: aborted() == before + 1, timeout=10)
  # Stopped early: the client read 2 chunks (1 + decode_steps tokens); the abort lands at the next step
  # boundary after the hang-up is seen (17 tokens here when measured), far from the 120 asked for.
  assert srv.service.snapshot()["generated_tokens"] - gen0 < 120
  snapshot_idle(srv)
  srv.engine.sched.check()


# ---- serve.py -----------------------------------------------------------------------------------


def test_serve_cli_help_lists_serve_keys(capsys):
  with pytest.raises(SystemExit) as e:
    serve.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for key in ("serve.port=8000", "serve.api_key", "serve.max_body_bytes", "--checkpoint", "--hf", "generate"):
    assert key in out


def test_serve_cli_without_a_model_says_how_to_get_one(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    serve.main(["serve.port=8123"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "python train.py" in err and "--checkpoint" in err and "--hf" in err
  with pytest.raises(SystemExit):
    serve.main(["model.n_layers=3"])
  assert "only serve.key=value" in capsys.readouterr().err


def test_serve_default_checkpoint_is_train_pys_run(tmp_path, monkeypatch):
  """No --checkpoint/--hf: the newest checkpoint of `python train.py`'s default run, with its tokenizer."""
  import jax

  from jaxllm.config import Config
  from jaxllm.model.params import model_def
  from jaxllm.serve.http.server import DEFAULT_CHECKPOINTS, example_curl, load_model
  from jaxllm.train.checkpoint import Checkpointer
  from jaxllm.train.optim import make_optimizer
  from jaxllm.train.state import init_state

  monkeypatch.chdir(tmp_path)
  config = Config(model=CFG)
  mdef = model_def(CFG)
  tx = make_optimizer(config.train, mdef.logical)
  state = init_state(mdef, tx, None, seed=3)
  ckpt = Checkpointer(DEFAULT_CHECKPOINTS, async_save=False)
  ckpt.save(0, state, {}, config)
  ckpt.close()
  model = load_model()
  assert model.name == "default" and model.cfg == CFG and model.tokenizer.vocab_size == TOK.vocab_size
  assert model.chat_template is None
  same = jax.tree.map(lambda a, b: bool((jax.device_get(a) == b).all()), state.params, model.params)
  assert all(jax.tree.leaves(same))
  curl = example_curl(dataclasses.replace(SERVE, port=8123), "default")
  assert curl.startswith("curl http://127.0.0.1:8123/v1/completions") and '"model": "default"' in curl


def test_chat_template_model_style():
  """A Hugging Face style template: sandboxed, raise_exception -> 400, add_generation_prompt."""
  from jaxllm.serve.http.errors import APIError

  src = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('system message must come first') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}{{ ''.__class__ }}"
  )
  t = ChatTemplate(src, TOK)
  assert t.render([{"role": "user", "content": "hi"}]) == "<|user|>hi\n<|assistant|>"  # no Python internals
  with pytest.raises(APIError) as e:
    t.render([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}])
  assert e.value.status == 400 and "system message must come first" in e.value.message
  with pytest.raises(ValueError):
    ChatTemplate("{% for %}", TOK)
