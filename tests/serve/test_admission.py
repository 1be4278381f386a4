"""Admission that does not serialise, and the host work of a step.

Contract:
- Admission reserves a clipped estimate of each request's decode (serve.reserve_clip), so chat
  requests without max_tokens (max_tokens = the rest of the context) run together on the default
  pool; when the estimate is wrong the pool runs out, running requests are preempted and recomputed,
  and every request still ends with the greedy output it has alone.
- With every running slot taken the waiting queue is not ordered (lpm matches every prompt).
- Each set_weights opens a fresh radix namespace, even under a version name used before.
- Response text is built from the new pieces only; non-streamed responses name the weights of
  every token; tokenizing and chat rendering run off the event loop.
"""

import asyncio
import dataclasses
import threading

import httpx
import numpy as np
import pytest
from test_http import CFG, KEY, MODEL, TOK, scrape, serving, wait_for
from test_serve import DENSE, PINNED, full_forward_greedy, params_of, shared_prefix_prompts

from jaxllm.config import ServeConfig
from jaxllm.model.params import init_params
from jaxllm.serve.detok import TextStream
from jaxllm.serve.engine import Engine
from jaxllm.serve.http import create_app
from jaxllm.serve.http.native import Generate
from jaxllm.serve.http.protocol import ModelInfo, parse_completion, parse_generate
from jaxllm.serve.http.responses import ChatCompletions, Completions, Output, TokenText
from jaxllm.serve.sampling import SamplingParams
from jaxllm.serve.scheduler import Req, Scheduler
from jaxllm.serve.service import EngineService, Event

DEFAULT = ServeConfig()


def default_scheduler(**kw) -> Scheduler:
  """A Scheduler with ServeConfig's defaults (what Engine builds), keywords overriding them."""
  return Scheduler.from_config(dataclasses.replace(DEFAULT, **kw))


def max_running_of_chat_burst(sched: Scheduler, steps: int = 12) -> int:
  """32 chat requests without max_tokens (max_tokens = the pool's context - prompt) at once: the
  most that run together over `steps` steps (sampled tokens are random; no request finishes)."""
  rng = np.random.default_rng(0)
  context = sched.alloc.total * sched.page_size  # the context is capped by the pool (ModelInfo)
  for i in range(32):
    prompt = list(map(int, rng.integers(0, 300, 40)))
    sched.add(Req(i, prompt, SamplingParams(max_tokens=context - len(prompt))))
  most = 0
  for _ in range(steps):
    batch = sched.schedule()
    most = max(most, len(sched.running))
    sched.commit(batch, rng.integers(0, 300, len(batch)), np.zeros(len(batch)), 0.0)
  sched.check()
  return most


def test_chat_without_max_tokens_runs_32_together_on_the_default_pool():
  assert max_running_of_chat_burst(default_scheduler()) == 32
  # Reserving all of max_tokens (no clip) runs them one at a time: the bug this fixes.
  assert max_running_of_chat_burst(default_scheduler(reserve_clip=0)) == 1


def test_worst_case_every_request_runs_to_its_max_tokens():
  """The burst at a 2k context with every request generating all of its ~2k max_tokens: the pool
  (16k tokens) runs out, requests are preempted (each once: it comes back with all of its max_tokens
  reserved), every request still finishes, and in fewer steps than reserving everything up front."""

  def run(**kw):
    sched, rng = default_scheduler(**kw), np.random.default_rng(0)
    reqs = [Req(i, list(map(int, rng.integers(0, 300, 40))), SamplingParams(max_tokens=2008)) for i in range(32)]
    for r in reqs:
      sched.add(r)
    steps = 0
    while sched.running or sched.waiting:
      batch = sched.schedule()
      assert batch, "no progress"
      sched.commit(batch, rng.integers(0, 300, len(batch)), np.zeros(len(batch)), 0.0)
      steps += 1
      if steps % 500 == 0:
        sched.check()
    assert all(len(r.output) == 2008 and r.finish_reason == "length" for r in reqs)
    return steps, [r.preemptions for r in reqs]

  steps, preempted = run()
  assert 0 < sum(preempted) and max(preempted) == 1
  full_steps, none = run(reserve_clip=0)
  assert sum(none) == 0 and steps < full_steps


def test_requests_within_the_clip_are_preempted_last():
  """A long request on a clipped estimate (L) runs; three short requests whose max_tokens is within
  the clip (all reserved) join and prefill in small chunks while L grows past its estimate. When the
  pool runs out, L is preempted, not a newer short request."""
  sched = Scheduler(14, 4, max_running=8, chunk_size=8, policy="fcfs", reserve_clip=8)
  long = Req(0, list(range(8)), SamplingParams(max_tokens=48))
  sched.add(long)
  rng = np.random.default_rng(0)

  def step():
    batch = sched.schedule()
    assert batch, "no progress"
    sched.commit(batch, rng.integers(0, 50, len(batch)), np.zeros(len(batch)), 0.0)

  for _ in range(6):
    step()
  short = [Req(i, list(range(20 * i, 20 * i + 16)), SamplingParams(max_tokens=8)) for i in range(1, 4)]
  for r in short:
    sched.add(r)
  while sched.running or sched.waiting:
    step()
  assert long.preemptions == 1 and [r.preemptions for r in short] == [0, 0, 0]
  assert len(long.output) == 48 and all(len(r.output) == 8 for r in short)
  sched.check()


def test_32_chat_requests_run_together_through_http():
  """The HTTP server on ServeConfig's pool defaults, a 2k-context model: 32 streamed chat requests
  without max_tokens are all running at once (the running gauge of /metrics says 32)."""
  cfg = dataclasses.replace(CFG, max_seq_len=2048)
  sc = dataclasses.replace(DEFAULT, api_key=KEY)
  engine = Engine(cfg, params_of(CFG), sc, detokenize=TOK.decode)  # the weights do not depend on max_seq_len
  service = EngineService(engine, max_waiting=sc.max_waiting).start()
  body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True, "ignore_eos": True}
  release = threading.Event()
  try:
    with serving(create_app(service, TOK, MODEL, sc, None)) as url:
      headers = {"Authorization": f"Bearer {KEY}"}

      async def one(client):
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
          assert r.status_code == 200
          async for _ in r.aiter_lines():
            if release.is_set():
              return  # hang up: the server aborts the request

      async def burst():
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
          await asyncio.gather(*(one(client) for _ in range(32)))

      clients = threading.Thread(target=asyncio.run, args=(burst(),), daemon=True)
      clients.start()
      with httpx.Client(base_url=url, headers=headers, timeout=60) as h:
        wait_for(lambda: scrape(h)["jaxllm:num_requests_running"] == 32, timeout=300)
      release.set()
      clients.join(timeout=60)
      wait_for(lambda: service.snapshot()["running"] == 0, timeout=60)
  finally:
    release.set()
    service.close()
  assert engine.stats.preemptions == 0  # 32 x (prompt + 256 reserved tokens) fit the pool
  engine.sched.check()


def test_preemption_under_pool_exhaustion_keeps_greedy_outputs():
  """A pool far too small for what the requests generate, a small clip: admission lets them all
  in, decode runs out of pages, running requests are preempted (recomputed), and every request
  still ends with exactly the greedy output it has alone."""
  prompts = shared_prefix_prompts(12, seed=3)
  want = full_forward_greedy(DENSE, prompts, 24)
  eng = Engine(DENSE, params_of(DENSE), **PINNED, max_pages=24, reserve_clip=4, chunk_size=32)
  got = eng.generate(prompts, SamplingParams(max_tokens=24))
  assert eng.sched.num_preemptions > 0
  assert [r.output for r in got] == want
  eng.sched.check()
  assert eng.idle and eng.sched.tree.protected == 0


@pytest.mark.parametrize(
  "pages, max_running",
  [
    (400, 4),  # every running slot taken
    (10, 8),  # slots free, but the running requests' reservations hold every page
  ],
)
def test_no_queue_ordering_when_nothing_can_be_admitted(pages, max_running):
  """lpm matches every waiting prompt in the radix tree to order the queue; when nobody can be
  admitted the queue must not be ordered at all."""
  sched = Scheduler(pages, 4, max_running=max_running, chunk_size=64, policy="lpm", reserve_clip=0)
  rng = np.random.default_rng(0)
  for i in range(4):  # 9 + 10 tokens: 5 pages each when all reserved
    sched.add(Req(i, list(map(int, rng.integers(0, 50, 9))), SamplingParams(max_tokens=10)))
  sched.commit(batch := sched.schedule(), np.zeros(len(batch), int), np.zeros(len(batch)), 0.0)
  running = len(sched.running)
  assert running == min(4, max_running, pages // 5)
  for i in range(4, 20):
    sched.add(Req(i, list(map(int, rng.integers(0, 50, 9))), SamplingParams(max_tokens=4)))
  calls = []
  real = sched.tree.prefix_len
  sched.tree.prefix_len = lambda *a: calls.append(a) or real(*a)
  for _ in range(3):
    batch = sched.schedule()
    assert len(batch) == running
    sched.commit(batch, np.zeros(running, int), np.zeros(running), 0.0)
  assert calls == []
  sched.check()


def test_reused_version_name_does_not_match_old_kv():
  """v1 -> v2 -> v1 with different weights under the second v1: the prompt cached by the first v1
  is not matched, and the output is the new weights' own."""
  A, B, C = params_of(DENSE), init_params(DENSE, 1), init_params(DENSE, 2)
  eng = Engine(DENSE, A, **PINNED, weight_version="v1")
  prompt = shared_prefix_prompts(1, seed=7)[0] + list(range(20))
  eng.generate([prompt], SamplingParams(max_tokens=2))
  assert eng.generate([prompt], SamplingParams(max_tokens=2))[0].cache_hit > 0  # cached under v1
  eng.set_weights(B, "v2")
  eng.set_weights(C, "v1")
  r = eng.generate([prompt], SamplingParams(max_tokens=4))[0]
  assert r.cache_hit == 0
  assert r.output == full_forward_greedy(DENSE, [prompt], 4, params=C)[0]
  assert eng.generate([prompt], SamplingParams(max_tokens=2))[0].cache_hit > 0  # the new v1 caches again
  eng.sched.check()


def test_service_sends_only_new_text(monkeypatch):
  """The service hands each event the text since the last one without re-joining the whole text
  (TextStream.text is never read on the engine thread)."""
  reads = []
  monkeypatch.setattr(TextStream, "text", property(lambda self: reads.append(1) or "".join(self._chunks)))
  eng = Engine(DENSE, params_of(DENSE), **PINNED, detokenize=lambda ids: "".join(chr(97 + t % 26) for t in ids))
  svc = EngineService(eng).start()
  events, done = [], threading.Event()

  def on_event(ev):
    events.append(ev)
    if ev.finish_reason:
      done.set()

  try:
    svc.submit(shared_prefix_prompts(1)[0], SamplingParams(max_tokens=20, stop=("zzz",)), on_event)
    assert done.wait(60)
  finally:
    svc.close()
  tokens = [t for e in events for t in e.token_ids]
  assert "".join(e.text for e in events) == eng.detokenize(tokens) and len(tokens) == 20
  assert reads == []


def _swap_events():
  """One choice's events: 3 tokens from weights 'A', then a swap, then 2 from 'B'."""
  base = dict(logprobs=[], top_logprobs=[], prompt_tokens=3)
  return [
    Event(0, [5, 6], "ab", weight_version="A", **base),
    Event(0, [7], "c", weight_version="A", **base),
    Event(0, [8, 9], "de", finish_reason="length", weight_version="B", completion_tokens=5, **base),
  ]


def test_non_streamed_responses_name_every_tokens_weights():
  info = ModelInfo(name=MODEL, vocab_size=384, context=128, eos_ids=(TOK.eos_id,), max_n=4)
  out = Output()
  for ev in _swap_events():
    out.add(ev)
  per_token = ["A", "A", "A", "B", "B"]
  body = {"model": MODEL, "prompt": "hey", "max_tokens": 5, "return_token_ids": True}
  parsed = parse_completion(body, info, TOK)
  choice = Completions(parsed, MODEL, TokenText(TOK)).response([out])["choices"][0]
  assert choice["weight_versions"] == per_token and choice["token_ids"] == [5, 6, 7, 8, 9]
  assert choice["weight_version"] == "B"  # the latest, as before
  choice = ChatCompletions(parsed, MODEL, TokenText(TOK)).response([out])["choices"][0]
  assert choice["weight_versions"] == per_token
  parsed = parse_generate({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 5}}, info, TOK)
  assert Generate(parsed).response([out])["meta_info"]["weight_versions"] == per_token
  assert out.text == "abcde" and out.chars == 5  # text kept as pieces, joined once


def test_tokenizing_runs_off_the_event_loop():
  """Tokenizing and chat rendering (which can take long for a long prompt) run in a worker thread:
  the tokenizer is never called with a running event loop in its thread."""
  on_loop = []

  class Tok:
    def __init__(self, inner):
      self.inner = inner

    def __getattr__(self, name):
      return getattr(self.inner, name)

    def encode(self, *a, **kw):
      try:
        asyncio.get_running_loop()
        on_loop.append(True)
      except RuntimeError:
        on_loop.append(False)
      return self.inner.encode(*a, **kw)

  sc = ServeConfig(page_size=8, num_pages=160, max_running=16, chunk_size=48, min_seqs=16, min_tokens=64)
  engine = Engine(CFG, params_of(CFG), sc, detokenize=TOK.decode)
  service = EngineService(engine).start()
  try:
    with serving(create_app(service, Tok(TOK), MODEL, sc, None)) as url, httpx.Client(base_url=url, timeout=300) as h:
      r = h.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
      assert r.status_code == 200
      msgs = [{"role": "user", "content": "hello"}]
      r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 2})
      assert r.status_code == 200
  finally:
    service.close()
  assert on_loop and not any(on_loop), on_loop
