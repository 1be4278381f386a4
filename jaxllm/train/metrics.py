"""Throughput/MFU accounting, the measured matmul peak it is relative to, and metric sinks
(JSONL always, TensorBoard when `tensorboardX` is installed)."""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=8)
def measure_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5, device=None) -> float:
  """Best achieved FLOP/s of an n x n matmul on one device (on CPU it uses every core)."""
  device = device or jax.devices()[0]
  dt = jnp.dtype(dtype)
  a = jax.device_put(jnp.ones((n, n), dt), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


class MetricsWriter:
  """Appends {"step", ...} lines to out_dir/metrics.jsonl (and TensorBoard scalars when tensorboardX
  is installed). resume_step: a run resumed from that checkpoint step first drops the lines of later
  steps, which a killed run wrote after its last checkpoint and the resumed run writes again."""

  def __init__(self, out_dir: str, resume_step: int | None = None):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(self.path):
      with open(self.path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    self.f = open(self.path, "a")
    self.tb = None
    try:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
    except ImportError:
      pass

  def write(self, step: int, values: dict) -> None:
    self.f.write(json.dumps({"step": step, **values}) + "\n")
    self.f.flush()
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    self.f.close()
    if self.tb is not None:
      self.tb.close()


def time_train_steps(step, state, batch, n: int):
  """One warm-up step, then n timed ones. -> (median seconds per step, final state, warm-up metrics)."""
  state, first = step(state, batch)
  jax.block_until_ready(first)
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2], state, first


def compiled_temp_bytes(jitted, *args) -> int:
  """Per-device temp memory (XLA memory_analysis) of `jitted` compiled for `args` (abstract
  ShapeDtypeStructs are enough: nothing runs)."""
  return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)
