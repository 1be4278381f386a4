"""The engine as a service: its loop runs in a thread of its own, and other threads (the asyncio HTTP
server, an RL trainer) talk to it only through an inbox drained between steps and per-request event
callbacks. The Engine itself stays single-threaded; nothing here knows HTTP, JSON or chat formats.

Each submitted request gets Events: the tokens generated since its last event, their text (the
request's TextStream: incremental, stop strings held back and removed), their logprobs, and on the
last one the finish reason and usage. Abort, weight swaps and cache flushes take effect at the next
step boundary.

Isolation: a request can fail only itself. A step that raises is retried without the requests that
caused it: the requests it ran are split in halves and each half is stepped alone (the others set
aside: preempted, their KV kept in the radix cache), down to the requests whose step still raises,
which end with an 'error' event; every other request goes on and produces the tokens it would have
alone. Submission, event building and finish hooks fail only their request the same way. When the
failure is the engine's (MAX_FAILED_STEPS steps in a row raise, whoever runs in them) or the thread
dies, every pending request gets an 'error' event, `dead` says why, and submit() raises EngineDead.
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
from jaxllm.serve.score import Scorer

log = logging.getLogger("jaxllm.serve")
MAX_FAILED_STEPS = 8  # steps in a row that raise, whoever is in them: the engine itself is broken
COMMAND_POLL_S = 0.05  # how often a caller waiting on the engine thread checks that it is alive


class QueueFull(RuntimeError):
  """More requests are waiting than serve.max_waiting allows; retry later."""


class EngineDead(RuntimeError):
  """The engine thread has stopped (closed, died, or its device failed): nothing would run."""


class _EngineFailure(RuntimeError):
  """Raised on the engine thread when step failures are not the requests' fault: ends the loop."""


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
  sent_chunks: int = 0  # the TextStream's deltas already sent


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
    self._batch: list[tuple] = []  # commands the engine thread took from the inbox, not yet applied
    self._lock = threading.Condition()
    self._tracked: dict[int, _Tracked] = {}
    self._ids = itertools.count()
    self._pending = 0  # submitted, not yet in the engine's queue
    self._thread: threading.Thread | None = None
    self._closed = False
    self.steps = 0
    self.step_failures = 0  # steps that raised (isolation retries included)
    self._failed_in_a_row = 0
    self.dead = ""  # why the engine thread stopped ("" while it runs)
    self.warmed_up = False  # warmup() has compiled every step shape
    self.scorer = Scorer(engine)

  # ---- any thread ---------------------------------------------------------------------------
  def add_finish_hook(self, hook: Callable[[Req, Timings], None]) -> None:
    """Call hook(req, timings) from the engine thread when a request finishes (not on errors).
    Add hooks before start()."""
    self._finish_hooks.append(hook)

  @property
  def stopped(self) -> bool:
    """The engine thread was started and is no longer running (closed or died)."""
    return bool(self.dead) or (self._thread is not None and not self._thread.is_alive())

  @property
  def busy(self) -> bool:
    """Requests are queued or running (read from any thread)."""
    return bool(self._tracked) or self._pending > 0

  def start(self) -> "EngineService":
    thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
    thread.start()  # before it is published: `stopped` must never see a created, unstarted thread
    self._thread = thread
    return self

  def close(self, reason: str = "the engine was closed") -> None:
    """Stop the engine thread; every request still queued or running ends with an error event
    carrying `reason`."""
    with self._lock:
      self._closed, self._close_reason = True, reason
      self._lock.notify()
    if self._thread is not None:
      self._thread.join()
    else:
      self._shutdown(reason)  # never started: answer what was queued all the same

  def submit(self, prompt_ids, sp: SamplingParams, on_event: Callable[[Event], None], streaming: bool = False) -> int:
    """Queue a request; returns its id. Raises ValueError for a request that can never run and
    QueueFull past serve.max_waiting. `on_event` is called from the engine thread. streaming: the
    client reads tokens as they come (Engine.add_request)."""
    prompt = self.engine.check_request(prompt_ids, sp)
    with self._lock:
      if self.stopped:
        raise EngineDead(self.dead or "the engine thread has stopped")
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

  def set_weights(self, params, version, timeout: float | None = None) -> None:
    """Swap weights between steps; returns once they are in place. Raises EngineDead when the engine
    thread stops first, TimeoutError after `timeout` seconds (None: no limit)."""
    self._command("weights", params, version, wait=True, timeout=timeout)

  def flush_cache(self, timeout: float | None = None) -> bool:
    """Drop the radix cache when idle; False if requests are in flight. Raises as set_weights."""
    return self._command("flush", wait=True, timeout=timeout)

  def warmup(self, wait: bool = False, timeout: float | None = None) -> None:
    """Compile every step shape on the engine thread (Engine.warmup) before the requests queued after
    this; `warmed_up` turns true when done. A warm-up that raises stops the engine (the device failed)."""
    self._command("warmup", wait=wait, timeout=timeout)

  def score(self, prompts, top: int = 0) -> list:
    """Prompt log-probs of each prompt (jaxllm.serve.score.PromptScore), `top` alternatives per
    position, under the current weights. Each group of prompts (Scorer.groups) is one forward on the
    engine thread between two steps (streams go on in between); a new shape compiles here first, on
    the caller's thread. Blocks: call from any thread but the engine's."""
    if self.stopped:
      raise EngineDead(self.dead or "the engine thread has stopped")
    out = []
    for group in self.scorer.groups([list(p) for p in prompts]):
      self.scorer.prepare(group, top)
      out += self._command("score", group, top, wait=True)
    return out

  def _command(self, *cmd, wait: bool = False, timeout: float | None = None):
    done, box = threading.Event(), []
    with self._lock:
      if self.stopped:
        if not wait:
          return None  # an abort after the end: nothing to do
        raise EngineDead(self.dead or "the engine thread has stopped")
      self._inbox.append(cmd + ((done, box),))
      self._lock.notify()
    if wait:
      deadline = None if timeout is None else time.monotonic() + timeout
      while not done.wait(COMMAND_POLL_S):  # never wait on a thread that is gone
        if self.stopped and not done.is_set():
          raise EngineDead(self.dead or "the engine thread has stopped")
        if deadline is not None and time.monotonic() > deadline:
          raise TimeoutError(f"the engine thread did not answer {cmd[0]!r} within {timeout:g} s")
      if isinstance(box[0], Exception):
        raise box[0]
      return box[0]

  # ---- the engine thread --------------------------------------------------------------------
  def _loop(self) -> None:
    eng, reason = self.engine, "the engine was closed"
    try:
      while True:
        with self._lock:
          while not self._inbox and eng.idle and not self._closed:
            self._lock.wait()
          if self._closed:
            reason = self._close_reason
            return
          self._batch, self._inbox = self._inbox, []
        while self._batch:  # each command leaves the batch once applied (a crash leaves it for _shutdown)
          self._apply(self._batch[0])
          self._batch.pop(0)
        if eng.idle:
          continue
        self._step()
        self._emit_progress()
    except BaseException as e:  # the device, a bug, or an injected exit: nothing runs from here on
      reason = f"the engine stopped: {type(e).__name__}: {e}"
      log.exception("engine thread stopped")
    finally:
      self._shutdown(reason)

  def _step(self) -> None:
    try:
      self.engine.step()
      self.steps += 1
      self._failed_in_a_row = 0
    except Exception as e:
      log.exception("engine step failed; looking for the requests that caused it")
      self._step_failed(e)
      self._isolate(f"{type(e).__name__}: {e}")

  def _step_failed(self, e: Exception) -> None:
    self.step_failures += 1
    self._failed_in_a_row += 1
    if self._failed_in_a_row >= MAX_FAILED_STEPS:
      raise _EngineFailure(f"{MAX_FAILED_STEPS} steps in a row failed, the last with {type(e).__name__}: {e}") from e

  def _isolate(self, error: str) -> None:
    """After a failed step: fail only the requests whose step still raises when they run alone."""
    sched = self.engine.sched
    suspects = list(sched.running) or list(sched.waiting)  # the step's rows (or a queue it could not admit)
    culprits = suspects if len(suspects) <= 1 else self._bisect(suspects)
    tracked = {id(t.req): t for t in self._tracked.values()}
    for req in culprits:
      log.error("request %s failed the engine step alone: %s", req.rid, error)
      if id(req) in tracked:
        self._fail(tracked[id(req)], error)
      else:
        self._take_out(req)

  def _bisect(self, group: list) -> list:
    """`group` failed a step together: step each half alone (one real step for it if it passes) and
    recurse into the halves that fail; returns the requests that fail on their own."""
    if len(group) == 1:
      return group
    out = []
    for part in (group[: len(group) // 2], group[len(group) // 2 :]):
      part = [r for r in part if r.finish_reason is None]
      if part and not self._step_alone(part):
        out += self._bisect(part)
    return out

  def _step_alone(self, group: list) -> bool:
    """One step of `group` only: every other request is set aside (running ones preempted, their
    computed KV kept in the radix cache) and put back after, in queue order. False if it raised."""
    eng, sched = self.engine, self.engine.sched
    keep = {id(r) for r in group}
    for r in [r for r in sched.running if id(r) not in keep]:
      sched._preempt(r)  # to the front of the queue, as for lack of pages
    aside = [r for r in sched.waiting if id(r) not in keep]
    sched.waiting = [r for r in sched.waiting if id(r) in keep]
    try:
      eng.step()
      eng.drain()  # with overlap the step was only launched
      self.steps += 1
      self._failed_in_a_row = 0
      return True
    except Exception as e:
      self._step_failed(e)
      return False
    finally:
      sched.waiting = sched.waiting + aside

  def _fail(self, t: _Tracked, error: str) -> None:
    """End one request with an 'error' event (taken out of the engine if it is still there)."""
    self._take_out(t.req)
    self._emit(t, error=error)

  def _take_out(self, req: Req) -> None:
    """Mark req failed and take it out of the engine's queues if it is still there."""
    if req.finish_reason is None:
      req.finish_reason = "error"
      try:
        self.engine.sched.abort(req, "error")
      except Exception:
        log.exception("could not take request %s out of the engine", req.rid)
    req.finish_reason = "error"

  def _shutdown(self, reason: str) -> None:
    """The loop has ended: every request and command still waiting gets its answer."""
    with self._lock:
      self.dead = reason
      inbox, self._batch, self._inbox = self._batch + self._inbox, [], []
    for cmd in inbox:
      if cmd[0] == "submit":
        rid, prompt, on_event = cmd[1], cmd[2], cmd[4]
        self._send(on_event, Event(rid, [], "", [], [], "error", len(prompt), error=reason))
      else:
        reply, box = cmd[-1]
        box.append(EngineDead(reason))
        reply.set()
    for t in list(self._tracked.values()):
      self._fail(t, reason)

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
      try:
        req = eng.add_request(prompt, sp, arrival=arrival, streaming=streaming)
      except Exception as e:  # fails this request only
        log.exception("request %s could not be queued", rid)
        self._send(on_event, Event(rid, [], "", [], [], "error", len(prompt), error=f"{type(e).__name__}: {e}"))
        return
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
      elif kind == "warmup":
        try:
          eng.warmup()
        except Exception as e:  # a device that cannot compile or run a step: the engine is unusable
          box.append(e)
          reply.set()
          raise _EngineFailure(f"warm-up failed: {type(e).__name__}: {e}") from e
        self.warmed_up = True
        box.append(None)
      elif kind == "score":
        box.append(self.scorer.score(cmd[1], cmd[2]))
    except _EngineFailure:
      raise
    except Exception as e:
      box.append(e)
    reply.set()

  def _emit(self, t: _Tracked, error: str = "") -> None:
    """Send what `t` produced since its last event. Building the event or a finish hook raising
    fails this request alone."""
    req = t.req
    try:
      ev = self._event(t, error)
    except Exception as e:
      log.exception("event of request %s failed", t.rid)
      self._take_out(req)
      error = error or f"{type(e).__name__}: {e}"
      ev = Event(t.rid, [], "", [], [], "error", len(req.prompt), req.cache_hit, len(req.output), req.extra_key, error)
    if ev.finish_reason:
      self._tracked.pop(ev.rid, None)
      if ev.finish_reason != "error":
        try:
          for hook in self._finish_hooks:
            hook(req, timings(req))
        except Exception as e:  # e.g. an RL consumer that could not take the rollout
          log.exception("finish hook failed for request %s", ev.rid)
          ev.finish_reason, ev.error = "error", f"a finish hook failed: {type(e).__name__}: {e}"
    self._send(t.on_event, ev)

  def _event(self, t: _Tracked, error: str) -> Event:
    req = t.req
    new = req.output[t.sent_tokens :]
    text = ""
    if req.stream is not None:
      text, t.sent_chunks = req.stream.text_since(t.sent_chunks)  # only the new deltas: O(new text)
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
    return ev

  @staticmethod
  def _send(on_event, ev: Event) -> None:
    try:
      on_event(ev)
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
      "score_compiles": self.scorer.compiles,
      **self.engine.gauges(),
      "inbox": self._pending,
      "step_failures": self.step_failures,
    }


def timings(req: Req) -> Timings:
  now = time.perf_counter()
  first = req.token_times[0] if req.token_times else now
  admitted = req.admitted if req.admitted is not None else now
  itl = [b - a for a, b in zip(req.token_times, req.token_times[1:])]
  return Timings(queue=admitted - req.arrival, ttft=first - req.arrival, e2e=now - req.arrival, itl=itl)
