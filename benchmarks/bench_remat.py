#!/usr/bin/env python
"""What each activation-memory option costs, side by side in one process: every model.remat policy
(and model.loss_chunk = 0, the loss over full [B, T, V] logits, against the chunked default) on one
model/batch: the compiled step's temp memory (XLA memory_analysis, per device; host temp for the
offload policy where the backend reports it), compile time and step time (median of a few steps).

  python benchmarks/bench_remat.py                            # small with 2 layers, B=2, T=512 (CPU-sized)
  python benchmarks/bench_remat.py --layers 0 --dtype bfloat16 --batch 8 --seq 2048   # full small, e.g. on a GPU
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from bench_train import build_one  # noqa: E402  (this directory; sets the CPU device count before jax starts)

from jaxllm.config import REMAT_POLICIES, ConfigError  # noqa: E402
from jaxllm.train.metrics import time_train_steps  # noqa: E402


def bench_one(a, remat: str, loss_chunk: int, unroll: int) -> dict:
  extra = [f"model.loss_chunk={loss_chunk}", f"model.scan_unroll={unroll}"] + (
    [f"model.n_layers={a.layers}"] if a.layers else []
  )
  r = build_one(a.model, "cpu-1", a.batch, a.seq, a.dtype, remat, extra)  # one device
  dt, _, m = time_train_steps(r["step"], r["state"], r["data"], a.steps)
  return {
    "remat": remat,
    "loss_chunk": loss_chunk,
    "unroll": unroll,
    "temp_MB": r["temp_MB"],
    "host_temp_MB": r["host_temp_MB"],
    "compile_s": r["compile_s"],
    "step_s": dt,
    "loss": float(m["loss"]),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="small")
  p.add_argument("--layers", type=int, default=2, help="override model.n_layers (0: the preset's)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--policies", default=",".join(REMAT_POLICIES))
  p.add_argument("--loss-chunk", type=int, default=128, help="model.loss_chunk of the policy rows (< seq to chunk)")
  p.add_argument("--unroll", type=int, default=1, help="model.scan_unroll of the policy rows")
  a = p.parse_args()
  print(
    f"platform {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); model={a.model} "
    f"layers={a.layers or 'preset'} batch={a.batch} seq={a.seq} dtype={a.dtype}"
  )
  runs = [(r, a.loss_chunk, a.unroll) for r in a.policies.split(",")]
  runs += [("none", 0, a.unroll)]  # the loss over full logits, for the loss_chunk saving
  if a.unroll == 1:
    runs += [("none", a.loss_chunk, 2)]  # scan unrolling
  print(
    f"{'remat':>24} {'loss_chunk':>10} {'unroll':>6} {'temp MB':>9} {'host MB':>8} {'compile s':>9} "
    f"{'step s':>8} {'loss':>8}"
  )
  for remat, chunk, unroll in runs:
    try:
      r = bench_one(a, remat, chunk, unroll)
    except (ConfigError, jax.errors.JaxRuntimeError, NotImplementedError) as e:
      print(f"{remat:>24} {chunk:>10} {unroll:>6}  n/a: {str(e).splitlines()[0][:120]}")
      continue
    print(
      f"{r['remat']:>24} {r['loss_chunk']:>10} {r['unroll']:>6} {r['temp_MB']:9.1f} {r['host_temp_MB']:8.1f} "
      f"{r['compile_s']:9.2f} {r['step_s']:8.3f} {r['loss']:8.4f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
