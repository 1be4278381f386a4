#!/usr/bin/env python
"""Training attention forward+backward time per implementation (model.attention), side by side in
one process, against PyTorch's scaled_dot_product_attention (causal, GQA) on the same shapes.

  python benchmarks/bench_attention.py                      # small's heads, B x T = 8x256 .. 1x2048
  python benchmarks/bench_attention.py --impl flash --shapes 1x4096 --no-torch

Each row: median of --steps timed calls (one warm-up call excluded) of value-and-gradient wrt q, k, v
with a fixed output cotangent, fp32. On CPU run it on a quiet machine: both sides use every core.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_train.py: torch's spinning threads

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.model.attention import self_attention  # noqa: E402


def median_time(fn, steps: int) -> float:
  jax.block_until_ready(fn())
  ts = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return sorted(ts)[len(ts) // 2]


def jax_fwd_bwd(impl: str, q, k, v, do):
  def f(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: self_attention(impl, q, k, v), q, k, v)
    return vjp(do)

  f = jax.jit(f)
  return lambda: f(q, k, v)


def torch_fwd_bwd(q, k, v, do, threads: int):
  import torch

  torch.set_num_threads(threads)
  qt, kt, vt = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
  dot = torch.tensor(np.asarray(do)).transpose(1, 2).contiguous()

  def step():
    for x in (qt, kt, vt):
      x.grad = None
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    out.backward(dot)

  return step


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--impl", default="flash,xla", help="model.attention implementations to time")
  p.add_argument("--shapes", default="8x256,4x512,2x1024,1x2048", help="B x T pairs")
  p.add_argument("--heads", default="12,4,64", help="N (query heads), K (kv heads), H (head dim): small's")
  p.add_argument("--steps", type=int, default=7)
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  a = p.parse_args()
  N, K, H = (int(x) for x in a.heads.split(","))
  impls = a.impl.split(",")
  print(f"platform {jax.devices()[0].platform}, fp32, N={N} K={K} H={H}; fwd+bwd ms, median of {a.steps}")
  head = f"{'B x T':>10}" + "".join(f"{i:>10}" for i in impls) + ("" if a.no_torch else f"{'torch':>10}")
  print(head + "\n" + "-" * len(head))
  for shape in a.shapes.split(","):
    B, T = (int(x) for x in shape.split("x"))
    rng = np.random.default_rng(0)
    q, do = (rng.standard_normal((B, T, N, H), np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, T, K, H), np.float32) for _ in range(2))
    row = f"{shape:>10}"
    for impl in impls:
      row += f"{1e3 * median_time(jax_fwd_bwd(impl, *map(jax.numpy.asarray, (q, k, v, do))), a.steps):>10.1f}"
    if not a.no_torch:
      row += f"{1e3 * median_time(torch_fwd_bwd(q, k, v, do, a.threads), a.steps):>10.1f}"
    print(row, flush=True)


if __name__ == "__main__":
  main()
