"""Static tick tables of the pipeline schedules: GPipe order and interleaved 1F1B (PP x vPP).

Megatron-LM's interleaved schedule (Narayanan et al., SC'21) puts `vpp` non-adjacent chunks of
`C = L/(pp*vpp)` layers on each of `pp` stages; a microbatch passes stage 0..pp-1 once per chunk
repeat `r`, the last stage handing it back to stage 0 (a circular pipeline, as in GSPMD/Praxis and
MaxText). Every tick each stage runs at most one chunk forward and (1F1B) one chunk backward, then the
forward ring `ppermute`s outputs to the next stage and the backward ring input-gradients to the previous.

Items. Stage 0 takes forward *items* (r, j) -- chunk repeat r of microbatch j -- in a fixed order, and
stage s runs item k at tick k + s. The order comes in groups of microbatches: within a group all of
repeat 0, then all of repeat 1, ...

  gpipe: one group of all m microbatches (the order autodiff's backward then reverses as a whole: every
         forward before any backward, so activations of all m microbatches are alive at once);
  1f1b:  groups of pp microbatches (the last one takes the m % pp rest), Megatron's interleaved order;
         backwards run group by group in the mirrored order (repeat vpp-1 first), on the backward ring,
         starting `delay` ticks after the forwards, so a stage holds ~2*pp*vpp chunk inputs whatever m.

A group of q >= pp microbatches keeps the ring in time: item (r, j) leaves the last stage at tick
k + pp - 1 and is needed at stage 0 for (r+1, j) at tick k + q; early arrivals wait in a small bank.

Each tick runs one forward and one backward (a fused 1F1B tick, not Megatron's one-action ticks): the
schedule then costs max(F + B) per tick and no idle half-ticks, at the price of about twice Megatron's
in-flight microbatches (still independent of m). Tables mark idle (stage, tick) slots -1; the step skips
their compute (`lax.cond`), so the bubble costs time only where a stage has nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxllm.config import ConfigError

SCHEDULES = ("gpipe", "1f1b")
COLUMNS = ("f_r", "f_j", "f_src", "f_bank", "g_put", "stash_put", "b_r", "b_j", "b_src", "b_bank", "stash_get")


@dataclass(frozen=True)
class Schedule:
  """Tick tables; every column is [ticks, pp] int32 with -1 for 'nothing'.

  f_r, f_j     forward chunk repeat and microbatch of (tick, stage); -1 when the stage idles.
  f_src        stage 0: -1 = embed microbatch f_j fresh, else the forward bank slot holding its input.
  f_bank       stage 0: bank slot for the item arriving on the forward ring this tick.
  g_put        last stage (1f1b): grad-bank slot for the loss gradient of a final chunk run this tick.
  stash_put    1f1b: stash slot that keeps this forward's input until its backward.
  b_r, b_j     1f1b backward chunk repeat and microbatch; -1 when idle.
  b_src        last stage: grad-bank slot of the output gradient; other stages read the backward ring.
  b_bank       last stage: grad-bank slot for the item arriving on the backward ring this tick.
  stash_get    stash slot of the input the backward recomputes from.
  """

  kind: str
  pp: int
  vpp: int
  m: int
  ticks: int
  delay: int  # 1f1b: ticks between a stage-0 forward item and the matching backward item
  n_fbank: int  # forward-bank slots (stage 0)
  n_gbank: int  # grad-bank slots (last stage)
  n_stash: int  # stashed chunk inputs per stage (1f1b): what bounds activation memory
  table: np.ndarray  # [len(COLUMNS), ticks, pp] int32

  def col(self, name: str) -> np.ndarray:
    return self.table[COLUMNS.index(name)]

  @property
  def bubble(self) -> float:
    """Idle fraction of the (stage, tick) forward slots."""
    return 1.0 - self.m * self.vpp / (self.ticks if self.kind == "gpipe" else self.ticks - self.delay)


class _Slots:
  """Slot allocator for a bank: a key takes the lowest free slot; slots released during a tick are
  reusable from the next tick on."""

  def __init__(self):
    self.of, self.free, self.released, self.n = {}, [], [], 0

  def put(self, key) -> int:
    if self.free:
      slot = self.free.pop(0)
    else:
      slot, self.n = self.n, self.n + 1
    self.of[key] = slot
    return slot

  def take(self, key) -> int:
    slot = self.of.pop(key)
    self.released.append(slot)
    return slot

  def end_tick(self):
    self.free = sorted(self.free + self.released)
    self.released = []


def groups(kind: str, pp: int, m: int) -> list[tuple[int, int]]:
  """(first microbatch, size) of each microbatch group."""
  if kind == "gpipe" or m < 2 * pp:
    return [(0, m)]
  n = m // pp
  return [(g * pp, pp) for g in range(n - 1)] + [((n - 1) * pp, pp + m % pp)]


def make_schedule(kind: str, pp: int, vpp: int, m: int) -> Schedule:
  if kind not in SCHEDULES:
    raise ConfigError(f"mesh.schedule={kind!r} is not one of {SCHEDULES}")
  if m < pp:
    raise ConfigError(f"mesh.microbatches={m} must be >= mesh.pp={pp}")
  gs = groups(kind, pp, m)
  fwd = [(r, j0 + i) for j0, q in gs for r in range(vpp) for i in range(q)]
  bwd = [(r, j0 + i) for j0, q in gs for r in reversed(range(vpp)) for i in range(q)]
  n = len(fwd)
  f_at, b_at = {it: k for k, it in enumerate(fwd)}, {it: k for k, it in enumerate(bwd)}
  if kind == "gpipe":
    delay, ticks = 0, n + pp - 1
  else:
    # A backward of (r, j) at stage s runs at delay + b_at + (pp-1-s) and must not precede its forward
    # at f_at + s; the last stage (s = pp-1) is the tightest, and also where the loss gradient starts.
    delay = max(f_at[it] - b_at[it] for it in fwd) + pp - 1
    ticks = delay + n + pp - 1
  tab = {c: np.full((ticks, pp), -1, np.int32) for c in COLUMNS}
  fbank, gbank = _Slots(), _Slots()
  stash = [_Slots() for _ in range(pp)]
  for t in range(ticks):
    # Arrivals first (they may be consumed in the same tick). Forward ring at stage 0: the last
    # stage's output of item t - pp, banked for the same microbatch's next repeat.
    ka = t - pp
    if 0 <= ka < n and fwd[ka][0] < vpp - 1:
      r, j = fwd[ka]
      tab["f_bank"][t, 0] = fbank.put((r + 1, j))
    if kind == "1f1b":
      # Backward ring at the last stage: stage 0's input-gradient of item (r, j), r > 0, is the
      # output gradient of (r-1, j) there.
      kb = t - delay - pp
      if 0 <= kb < n and bwd[kb][0] > 0:
        r, j = bwd[kb]
        tab["b_bank"][t, pp - 1] = gbank.put((r - 1, j))
    for s in range(pp):
      k = t - s
      if 0 <= k < n:
        r, j = fwd[k]
        tab["f_r"][t, s], tab["f_j"][t, s] = r, j
        if s == 0 and r > 0:
          tab["f_src"][t, s] = fbank.take((r, j))
        if kind == "1f1b":
          tab["stash_put"][t, s] = stash[s].put((r, j))
          if s == pp - 1 and r == vpp - 1:
            tab["g_put"][t, s] = gbank.put((r, j))
    if kind == "1f1b":
      for s in range(pp):
        k = t - delay - (pp - 1 - s)
        if 0 <= k < n:
          r, j = bwd[k]
          tab["b_r"][t, s], tab["b_j"][t, s] = r, j
          tab["stash_get"][t, s] = stash[s].take((r, j))
          if s == pp - 1:
            tab["b_src"][t, s] = gbank.take((r, j))
    for slots in (fbank, gbank, *stash):
      slots.end_tick()
  assert not fbank.of and not gbank.of and not any(st.of for st in stash), "schedule left items behind"
  table = np.stack([tab[c] for c in COLUMNS])
  return Schedule(
    kind, pp, vpp, m, ticks, delay, max(fbank.n, 1), max(gbank.n, 1), max(max(st.n for st in stash), 1), table
  )


def format_schedule(sched: Schedule) -> str:
  """One startup line, e.g. `pipeline 1f1b pp=2 vpp=2 m=8: 23 ticks, bubble ..., stash 6 inputs/stage`."""
  s = sched
  line = (
    f"pipeline {s.kind} pp={s.pp} vpp={s.vpp} m={s.m}: {s.ticks} ticks, "
    f"bubble {100 * s.bubble:.1f}% of forward slots (vpp=1 would be {100 * (s.pp - 1) / (s.m + s.pp - 1):.1f}%)"
  )
  if s.kind == "1f1b":
    line += f", {s.n_stash} stashed chunk inputs per stage (GPipe order keeps {s.m * s.vpp})"
  return line


def render(sched: Schedule, width: int = 120) -> str:
  """Text chart of the schedule: one row per stage, one column per tick; `F rj` / `B rj` cells
  (r = chunk repeat, j = microbatch) -- forward on top, backward below."""
  cell = 4
  lines = []
  for s in range(sched.pp):
    for name, rc, jc in (("F", "f_r", "f_j"), ("B", "b_r", "b_j")):
      if name == "B" and sched.kind == "gpipe":
        continue
      r, j = sched.col(rc)[:, s], sched.col(jc)[:, s]
      cells = "".join(f"{r[t]}{j[t]:<{cell - 2}} " if r[t] >= 0 else "." * (cell - 1) + " " for t in range(sched.ticks))
      lines.append(f"stage {s} {name} | " + cells[:width])
  return "\n".join(lines)
