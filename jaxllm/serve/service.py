"""The engine as a service: its loop runs in a thread of its own, and other threads (the asyncio HTTP
server, an RL trainer) talk to it only through an inbox drained between steps and per-request event
callbacks. The Engine itself stays single-threaded; nothing here knows HTTP, JSON or chat formats.

Each submitted request gets Events: the tokens generated since its last event, their text (the
request's TextStream: incremental, stop strings held back and removed), their logprobs, and on the
last one the finish reason and usage. Abort, weight swaps and cache flushes take effect at the next
step boundary. A failing step fails the requests in it with an 'error' event; the loop goes on.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams
from jaxllm.serve.scheduler import Req

log = logging.getLogger("jaxllm.serve")


class QueueFull(RuntimeError):
  """More requests are waiting than serve.max_waiting allows; retry later."""


@dataclass
class Event:
  rid: int
  token_ids: list  # tokens generated since the previous event
  text: str  # their text (may be "" while a partial character or stop is held)
  logprobs: list  # logprob of each of those tokens (empty unless requested)
  top_logprobs: list  # per token, [(id, logprob)] of the sp.top_logprobs likeliest (raw model)
  finish_reason: str | None = None  # 'stop', 'length', 'abort' or 'error' on the last event
  prompt_tokens: int = 0
  cached_tokens: int = 0  # prompt tokens reused from the radix cache
  completion_tokens: int = 0  # tokens generated so far
  weight_version: object = None  # the weights that produced these tokens
  error: str = ""  # what went wrong, with finish_reason 'error'


@dataclass
class _Tracked:
  rid: int
  req: Req
  on_event: Callable[[Event], None]
  sent_tokens: int = 0
  sent_text: int = 0


@dataclass
class Timings:
  """Per finished request, for latency histograms (seconds)."""

  queue: float
  ttft: float
  e2e: float
  itl: list = field(default_factory=list)


class EngineService:
  def __init__(self, engine: Engine, max_waiting: int = 256, on_finish: Callable[[Req, Timings], None] | None = None):
    self.engine, self.max_waiting = engine, max_waiting
    self._finish_hooks = [on_finish] if on_finish is not None else []
    self._inbox: list[tuple] = []
    self._lock = threading.Condition()
    self._tracked: dict[int, _Tracked] = {}
    self._ids = itertools.count()
    self._pending = 0  # submitted, not yet in the engine's queue
    self._thread: threading.Thread | None = None
    self._closed = False
    self.steps = 0

  # ---- any thread ---------------------------------------------------------------------------
  def add_finish_hook(self, hook: Callable[[Req, Timings], None]) -> None:
    """Call hook(req, timings) from the engine thread when a request finishes (not on errors).
    Add hooks before start()."""
    self._finish_hooks.append(hook)

  @property
  def stopped(self) -> bool:
    """The engine thread was started and is no longer running (closed or died)."""
    return self._thread is not None and not self._thread.is_alive()

  def start(self) -> "EngineService":
    self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
    self._thread.start()
    return self

  def close(self) -> None:
    with self._lock:
      self._closed = True
      self._lock.notify()
    if self._thread is not None:
      self._thread.join()

  def submit(self, prompt_ids, sp: SamplingParams, on_event: Callable[[Event], None], streaming: bool = False) -> int:
    """Queue a request; returns its id. Raises ValueError for a request that can never run and
    QueueFull past serve.max_waiting. `on_event` is called from the engine thread. streaming: the
    client reads tokens as they come (Engine.add_request)."""
    prompt = self.engine.check_request(prompt_ids, sp)
    with self._lock:
      if self._pending + len(self.engine.sched.waiting) >= self.max_waiting:
        raise QueueFull(f"{self.max_waiting} requests are already waiting")
      rid = next(self._ids)
      self._pending += 1
      self._inbox.append(("submit", rid, prompt, sp, on_event, time.perf_counter(), streaming))
      self._lock.notify()
    return rid

  def abort(self, rid: int) -> None:
    """Cancel at the next step boundary (a no-op for a finished request)."""
    self._command("abort", rid)

  def set_weights(self, params, version) -> None:
    """Swap weights between steps; returns once they are in place."""
    self._command("weights", params, version, wait=True)

  def flush_cache(self) -> bool:
    """Drop the radix cache when idle; False if requests are in flight."""
    return self._command("flush", wait=True)

  def _command(self, *cmd, wait: bool = False):
    done, box = threading.Event(), []
    with self._lock:
      self._inbox.append(cmd + ((done, box),))
      self._lock.notify()
    if wait:
      done.wait()
      if isinstance(box[0], Exception):
        raise box[0]
      return box[0]

  # ---- the engine thread --------------------------------------------------------------------
  def _loop(self) -> None:
    eng = self.engine
    while True:
      with self._lock:
        while not self._inbox and eng.idle and not self._closed:
          self._lock.wait()
        if self._closed:
          return
        inbox, self._inbox = self._inbox, []
      for cmd in inbox:
        self._apply(cmd)
      if eng.idle:
        continue
      try:
        eng.step()
        self.steps += 1
      except Exception as e:  # keep serving: fail what was in flight, say why
        log.exception("engine step failed")
        for t in list(self._tracked.values()):
          if t.req.finish_reason is None:
            eng.abort(t.req)
          t.req.finish_reason = "error"
          self._emit(t, error=f"{type(e).__name__}: {e}")
        continue
      self._emit_progress()

  def _emit_progress(self) -> None:
    for t in list(self._tracked.values()):
      if len(t.req.output) > t.sent_tokens or t.req.finish_reason:
        self._emit(t)

  def _apply(self, cmd) -> None:
    eng, kind = self.engine, cmd[0]
    if kind == "submit":
      _, rid, prompt, sp, on_event, arrival, streaming = cmd
      with self._lock:
        self._pending -= 1
      req = eng.add_request(prompt, sp, arrival=arrival, streaming=streaming)
      self._tracked[rid] = _Tracked(rid, req, on_event)
      return
    reply, box = cmd[-1]
    try:
      if kind == "abort":
        t = self._tracked.get(cmd[1])
        if t is not None and eng.abort(t.req):
          self._emit(t)
        box.append(None)
      elif kind == "weights":
        eng.set_weights(cmd[1], cmd[2])
        self._emit_progress()  # the step in flight committed tokens of the old weights: send them as such
        box.append(None)
      elif kind == "flush":
        box.append(eng.flush_cache())
    except Exception as e:
      box.append(e)
    reply.set()

  def _emit(self, t: _Tracked, error: str = "") -> None:
    req = t.req
    new = req.output[t.sent_tokens :]
    text = ""
    if req.stream is not None:
      text = req.stream.text[t.sent_text :]
      t.sent_text += len(text)
    ev = Event(
      t.rid,
      new,
      text,
      req.logprobs[t.sent_tokens :] if req.sp.logprobs else [],
      req.top_logprobs[t.sent_tokens :] if req.sp.top_logprobs else [],
      req.finish_reason,
      len(req.prompt),
      req.cache_hit,
      len(req.output),
      req.extra_key,
      error,
    )
    t.sent_tokens = len(req.output)
    if req.finish_reason:
      del self._tracked[ev.rid]
      if req.finish_reason != "error":
        for hook in self._finish_hooks:
          hook(req, timings(req))
    try:
      t.on_event(ev)
    except Exception:  # a broken consumer must not stop the engine
      log.exception("event callback failed for request %s", ev.rid)

  def snapshot(self) -> dict:
    """Counters and gauges for /metrics (read from any thread; ints and a dict copy)."""
    st = self.engine.stats
    return {
      "prompt_tokens": st.prompt_tokens,
      "cached_tokens": st.cached_tokens,
      "generated_tokens": st.generated_tokens,
      "computed_tokens": st.computed_tokens,
      "preemptions": st.preemptions,
      "finished": dict(st.finished),
      "compiles": self.engine.compiles,
      **self.engine.gauges(),
      "inbox": self._pending,
    }


def timings(req: Req) -> Timings:
  now = time.perf_counter()
  first = req.token_times[0] if req.token_times else now
  admitted = req.admitted if req.admitted is not None else now
  itl = [b - a for a, b in zip(req.token_times, req.token_times[1:])]
  return Timings(queue=admitted - req.arrival, ttft=first - req.arrival, e2e=now - req.arrival, itl=itl)
