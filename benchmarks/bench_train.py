#!/usr/bin/env python
"""Training throughput and MFU, side by side in one process: models x meshes, against the measured
matmul peak of this machine (not a datasheet number).

  python benchmarks/bench_train.py                       # tiny and small on cpu-1 and cpu-8
  python benchmarks/bench_train.py --models small --meshes cpu-1 --dtype bfloat16   # e.g. on a GPU
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.config import load_config  # noqa: E402
from jaxllm.model.params import model_def  # noqa: E402
from jaxllm.parallel import build_mesh, mesh_hooks  # noqa: E402
from jaxllm.train.metrics import measure_matmul_peak, time_train_steps  # noqa: E402
from jaxllm.train.optim import make_optimizer  # noqa: E402
from jaxllm.parallel.sharding import batch_sharding  # noqa: E402
from jaxllm.train.state import init_state, state_shardings  # noqa: E402
from jaxllm.train.step import make_train_step  # noqa: E402

MESHES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "meshes")


def bench_one(model: str, mesh_name: str, batch: int, seq: int, steps: int, dtype: str, remat: str) -> dict:
  overrides = [f"model={model}", f"model.dtype={dtype}", f"model.remat={remat}", f"train.batch_size={batch}",
               f"train.seq_len={seq}"]
  mesh_file = os.path.join(MESHES, f"{mesh_name}.toml")
  if os.path.exists(mesh_file):
    overrides.append(f"mesh={mesh_file}")
  else:  # "all": every local device as data parallel
    overrides.append(f"mesh.dp={len(jax.devices())}")
  cfg = load_config([], overrides)
  mesh, plan = build_mesh(cfg.mesh, jax.devices()[:cfg.mesh.num_devices])
  mdef = model_def(cfg.model)
  tx = make_optimizer(cfg.train, mdef.logical)
  sh = state_shardings(mdef, tx, mesh, plan)
  state = init_state(mdef, tx, sh, 0)
  b_sh = batch_sharding(mesh, plan)
  step = make_train_step(mdef, tx, sh, b_sh, hook_kwargs=mesh_hooks(mesh, plan, cfg.model))
  rng = np.random.default_rng(0)
  data = jax.device_put({k: jnp.asarray(rng.integers(0, 256, (batch, seq)), jnp.int32)
                         for k in ("inputs", "targets")}, b_sh)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  dt, state, m = time_train_steps(step, state, data, steps)
  tok_s = batch * seq / dt
  return {"model": model, "mesh": mesh_name, "params_M": cfg.model.param_counts()["total"] / 1e6,
          "tokens": batch * seq, "compile_s": compile_s, "step_s": dt, "tok_s": tok_s,
          "tflops": tok_s * cfg.model.flops_per_token(seq) / 1e12,
          "temp_MB": getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20, "first_loss": float(m["loss"])}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="tiny,small")
  p.add_argument("--meshes", default="cpu-1,cpu-8", help="meshes/NAME.toml presets, or 'all' (every device as dp)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  a = p.parse_args()
  peak = measure_matmul_peak(a.dtype)
  platform = jax.devices()[0].platform
  n_chips = 1 if platform == "cpu" else None
  print(f"platform {platform} ({jax.devices()[0].device_kind}), measured {a.dtype} matmul peak "
        f"{peak / 1e12:.3f} TFLOP/s per {'machine (all cores)' if platform == 'cpu' else 'device'}")
  rows = []
  for model in a.models.split(","):
    for mesh in a.meshes.split(","):
      r = bench_one(model, mesh, a.batch, a.seq, a.steps, a.dtype, a.remat)
      chips = n_chips or (8 if mesh == "cpu-8" else 1)
      r["mfu"] = r["tflops"] * 1e12 / (peak * (chips if platform != "cpu" else 1))
      rows.append(r)
      print(f"  done {model} on {mesh}", flush=True)
  head = f"{'model':<8}{'mesh':<8}{'params':>8}{'tok/step':>10}{'compile s':>11}{'step s':>9}{'tok/s':>10}" \
         f"{'TFLOP/s':>9}{'MFU':>7}{'temp MB':>9}"
  print(head + "\n" + "-" * len(head))
  for r in rows:
    print(f"{r['model']:<8}{r['mesh']:<8}{r['params_M']:>7.1f}M{r['tokens']:>10}{r['compile_s']:>11.1f}"
          f"{r['step_s']:>9.3f}{r['tok_s']:>10,.0f}{r['tflops']:>9.3f}{100 * r['mfu']:>6.1f}%{r['temp_MB']:>9.0f}")
  print("MFU = model FLOPs (6N + causal attention, per token) x tokens/s / measured matmul peak; "
        "on CPU the 8 emulated devices share the same cores, so the peak is the whole machine's.")


if __name__ == "__main__":
  main()
