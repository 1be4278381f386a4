"""The engine's penalty state: one device store of fixed shape [S, V] that lives across calls, a slot
per penalised request (presence/frequency/repetition penalties, jaxllm.serve.sampling step 4). Its
shape never depends on requests (a history width would select a compile shape), nothing of a
request's history is re-sent each step, and it moves on by the device's own sampled tokens, so a
step launched behind another (overlap) sees the tokens still in flight.

  penalty_store, fill_penalty_slot, gather_penalty_state, count_tokens   device functions (jit-friendly)
  PenaltySlots                                                          the store and, on the host, which
                                                                        request holds which slot
Shapes: S slots (the engine's largest batch), V vocab, R rows of a step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PENALTY_FILL = 256  # ids per call of fill_penalty_slot (a fixed shape: long histories take several calls)


def penalty_store(S: int, V: int) -> dict:
  """Zeroed store of S slots: counts [S, V] int32 (generated-token counts), prompt [S, V] bool."""
  return {"counts": jnp.zeros((S, V), jnp.int32), "prompt": jnp.zeros((S, V), bool)}


def fill_penalty_slot(store: dict, slot, ids, kinds, reset) -> dict:
  """Write up to PENALTY_FILL ids of one request's history into slot `slot`: ids [C] int32, kinds [C]
  int32 (1 = prompt id, 2 = generated id, 0 = padding); reset: clear the slot first (the first chunk).
  A history longer than C takes several calls, so this compiles once."""
  V = store["counts"].shape[1]
  counts = jnp.where(reset, 0, store["counts"][slot]).at[jnp.where(kinds == 2, ids, V)].add(1, mode="drop")
  prompt = jnp.where(reset, False, store["prompt"][slot]).at[jnp.where(kinds == 1, ids, V)].set(True, mode="drop")
  return {"counts": store["counts"].at[slot].set(counts), "prompt": store["prompt"].at[slot].set(prompt)}


def gather_penalty_state(samp: dict, store: dict) -> dict:
  """samp plus the `init_penalty_state` keys of its rows, read from the store by samp["pen_slot"]
  (rows without a slot: zeros; no row with one: the gather is skipped at run time)."""
  slot = samp["pen_slot"]
  R, V = slot.shape[0], store["counts"].shape[1]
  has = (slot >= 0)[:, None]

  def gather(_):
    i = jnp.maximum(slot, 0)
    return jnp.where(has, store["counts"][i], 0), has & store["prompt"][i]

  empty = lambda _: (jnp.zeros((R, V), jnp.int32), jnp.zeros((R, V), bool))
  gen, prm = jax.lax.cond(jnp.any(slot >= 0), gather, empty, None)
  return samp | {"gen_counts": gen, "prompt_mask": prm}


def count_tokens(store: dict, samp: dict, tokens) -> dict:
  """The store after a call that sampled tokens [R] or [n, R] (step j of a multi-step call): each row
  with a slot counts the first samp["pen_steps"] of them, the ones the host keeps."""
  toks = tokens if tokens.ndim == 2 else tokens[None]
  slot, V = samp["pen_slot"], store["counts"].shape[1]
  keep = (jnp.arange(toks.shape[0])[:, None] < samp["pen_steps"][None, :]) & (slot >= 0)[None, :]
  rows = jnp.broadcast_to(jnp.maximum(slot, 0)[None, :], toks.shape)
  return store | {"counts": store["counts"].at[rows, jnp.where(keep, toks, V)].add(1, mode="drop")}


class _Counted:
  """A jitted function that counts its traces (compilations), like the engine's step functions."""

  def __init__(self, fn, **jit_kw):
    self.traces = 0

    def traced(*args):
      self.traces += 1
      return fn(*args)

    self.fn = jax.jit(traced, **jit_kw)

  def __call__(self, *args):
    return self.fn(*args)


_FILL: _Counted | None = None


def _penalty_fill() -> _Counted:
  """fill_penalty_slot, jitted once per process (the store is donated)."""
  global _FILL
  if _FILL is None:
    _FILL = _Counted(fill_penalty_slot, donate_argnums=(0,))
  return _FILL


class PenaltySlots:
  """The device store of S slots and the host's record of which request holds which slot and how
  many of its tokens the slot has counted (in-flight ones included). `store` is donated through the
  step functions: the engine passes it in and puts the returned one back."""

  def __init__(self, S: int, V: int, sharding=None):
    self.store = penalty_store(S, V)
    if sharding is not None:
      self.store = jax.device_put(self.store, sharding)
    self.rows: dict = {}  # Req -> [slot, tokens its slot has counted, in flight included]
    self.free = list(range(S))
    self._fill = _penalty_fill()

  @property
  def traces(self) -> int:
    return self._fill.traces

  def slots(self, batch, ahead, keeps) -> list[int]:
    """Each row's slot (-1: unpenalised), filled from prompt + output when it does not hold exactly
    the request's tokens so far. ahead[i]: row i's tokens in flight; keeps[i]: how many of its sampled
    tokens the host will keep (the store counts those)."""
    slots = []
    for (r, _), a, k in zip(batch, ahead, keeps):
      if not r.sp.uses_penalties:
        slots.append(-1)
        continue
      row = self.rows.get(r)
      if row is None:
        row = self.rows[r] = [self._take({b for b, _ in batch}), -1]
      if row[1] != len(r.output) + a:  # new, preempted out of its slot, or tokens were dropped
        self.fill(row[0], r.prompt, r.output)
        row[1] = len(r.output)
      row[1] += k
      slots.append(row[0])
    return slots

  def current(self, r, tokens: int) -> bool:
    """Whether r's slot (if it is penalised) has counted exactly `tokens` of its tokens: a step can
    then be chained behind the running one without the host refilling the slot."""
    return not r.sp.uses_penalties or self.rows.get(r, (0, -1))[1] == tokens

  def _take(self, busy: set) -> int:
    """A free slot: finished requests give theirs back; if none is free, a request outside this batch
    (waiting, preempted) loses its slot and is refilled when it runs."""
    if not self.free:
      for r in [r for r in self.rows if r.finish_reason is not None]:
        self.free.append(self.rows.pop(r)[0])
    if not self.free:
      r = next(r for r in self.rows if r not in busy)
      self.free.append(self.rows.pop(r)[0])
    return self.free.pop()

  def fill(self, slot: int, prompt, output) -> None:
    """Write a request's prompt and output ids into its slot, PENALTY_FILL ids per call."""
    ids = np.asarray(list(prompt) + list(output), np.int32)
    kinds = np.where(np.arange(len(ids)) < len(prompt), 1, 2).astype(np.int32)
    for a in range(0, len(ids), PENALTY_FILL):
      chunk = np.zeros((2, PENALTY_FILL), np.int32)
      n = min(PENALTY_FILL, len(ids) - a)
      chunk[0, :n], chunk[1, :n] = ids[a : a + n], kinds[a : a + n]
      self.store = self._fill(self.store, np.int32(slot), chunk[0], chunk[1], np.bool_(a == 0))

  def warmup(self) -> None:
    """Compile the fill (one shape) on slot 0; slot 0's owner is refilled when it runs next."""
    self.fill(0, [0], [])
    for row in self.rows.values():
      row[1] = -1 if row[0] == 0 else row[1]
