"""Circular pipeline benchmark on the emulated 8-device CPU mesh: schedule accounting, train-step
times for vpp=1 vs 2 vs 4 at equal m (side by side, with the non-pipelined step as baseline), and
compiled temp memory against m with and without the tick-input remat.

  python benchmarks/bench_pipeline.py [--steps 5] [--pp 2] [--m 4]

All 8 emulated devices share the host's cores, so bubble slots (stages computing on garbage) cost
real time here, and the step time tracks total stage-slots = pp * (m*vpp + pp - 1) chunk runs.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxllm.config import MeshConfig, ModelConfig, TrainConfig  # noqa: E402
from jaxllm.model.params import model_def  # noqa: E402
from jaxllm.parallel import mesh_hooks  # noqa: E402
from jaxllm.parallel import pipeline as pl  # noqa: E402
from jaxllm.parallel.mesh import build_mesh  # noqa: E402
from jaxllm.parallel.sharding import batch_sharding, param_shardings  # noqa: E402
from jaxllm.train.metrics import compiled_temp_bytes  # noqa: E402
from jaxllm.train.optim import make_optimizer  # noqa: E402
from jaxllm.train.state import init_state, state_shardings  # noqa: E402
from jaxllm.train.step import grads_and_metrics, make_train_step, pipelined  # noqa: E402


def model_cfg(n_layers):
  return ModelConfig(vocab_size=256, d_model=128, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=384)


def build_step(mesh_cfg: MeshConfig, mcfg: ModelConfig, batch_size: int, seq: int):
  """A compiled, warmed-up train step: returns run() -> loss, running one optimizer step."""
  mesh, plan = build_mesh(mesh_cfg)
  mdef = model_def(mcfg)
  tx = make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0, steps=100), mdef.logical)
  sh = state_shardings(mdef, tx, mesh, plan)   # with pp > 1 the layer stack is split over the stages
  forward = pipelined(mdef, mesh, plan, mesh_cfg.microbatches) if mesh_cfg.pp > 1 else None
  b_sh = NamedSharding(mesh, P(plan.dims["dp"] or None))
  with jax.set_mesh(mesh):
    box = [init_state(mdef, tx, sh, seed=0)]
    step = make_train_step(mdef, tx, sh, b_sh, hook_kwargs=mesh_hooks(mesh, plan, mcfg), forward=forward)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, mcfg.vocab_size, (batch_size, seq + 1)), jnp.int32)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, b_sh)

  def run():
    with jax.set_mesh(mesh):
      box[0], metrics = step(box[0], batch)
      return float(jax.block_until_ready(metrics)["loss"])
  run()   # compile + warm up
  return run


def pipeline_grads_temp_bytes(mdef, mesh, plan, m, per_microbatch, seq, remat=True) -> int:
  """Compiled (not run) temp memory per device of the pipelined gradients for m microbatches."""
  tokens = jax.ShapeDtypeStruct((m * per_microbatch, seq), jnp.int32)
  fwd = pipelined(mdef, mesh, plan, m, remat=remat)
  p_sh = param_shardings(mdef, mesh, plan)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b, forward=fwd),
                 in_shardings=(p_sh, batch_sharding(mesh, plan)), out_shardings=(p_sh, None))
    return compiled_temp_bytes(fn, mdef.abstract_params(), {"inputs": tokens, "targets": tokens})


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--pp", type=int, default=2)
  ap.add_argument("--m", type=int, default=4)
  ap.add_argument("--seq", type=int, default=64)
  args = ap.parse_args()
  pp, m, seq = args.pp, args.m, args.seq
  dp = 8 // pp
  L = pp * 4   # divisible by pp*vpp for vpp in 1, 2, 4
  mcfg = model_cfg(L)
  batch = m * dp * 2

  print(f"jax {jax.__version__} {jax.devices()[0].platform} x{len(jax.devices())}; model d={mcfg.d_model} "
        f"L={L} seq={seq}; global batch {batch} = m {m} x {batch // m}")
  print("\n== schedule ==")
  print(f"{'pp':>3} {'vpp':>4} {'m':>3} {'ticks':>6} {'valid/slots':>12} {'bubble':>8}")
  for q in (2, 4, 8):
    for v in (1, 2, 4):
      for mm in (q, 2 * q):
        s = pl.schedule_info(q, v, mm)
        print(f"{q:>3} {v:>4} {mm:>3} {s['ticks']:>6} {str(s['valid_slots']) + '/' + str(s['slots']):>12} "
              f"{100 * s['bubble']:>7.1f}%")

  print(f"\n== train step, pp={pp} dp={dp}, m={m}: median of {args.steps} steps, configs run round-robin ==")
  configs = [("no pipeline (dp=8)", MeshConfig(dp=8), None)]
  configs += [(f"pp={pp} vpp={v}", MeshConfig(pp=pp, vpp=v, dp=dp, microbatches=m), pl.schedule_info(pp, v, m))
              for v in (1, 2, 4)]
  runs = [build_step(c, mcfg, batch, seq) for _, c, _ in configs]
  times, losses = [[] for _ in runs], [None] * len(runs)
  for _ in range(args.steps):   # interleaved, so load changes on the host hit every config alike
    for i, run in enumerate(runs):
      t0 = time.perf_counter()
      losses[i] = run()
      times[i].append(time.perf_counter() - t0)
  print(f"{'config':<22} {'ticks':>6} {'bubble':>8} {'step ms':>9} {'loss@last':>10}")
  for (name, _, s), ts, loss in zip(configs, times, losses):
    ticks, bub = (s["ticks"], f"{100 * s['bubble']:.1f}%") if s else ("-", "-")
    print(f"{name:<22} {ticks:>6} {bub:>8} {1e3 * statistics.median(ts):>9.1f} {loss:>10.4f}")

  print(f"\n== compiled temp memory per device vs m (pp={pp} vpp=2, {dp} seqs of {seq} per microbatch) ==")
  mesh, plan = build_mesh(MeshConfig(pp=pp, vpp=2, dp=dp, microbatches=pp))
  mdef = model_def(mcfg)
  print(f"{'m':>4} {'remat (tick input) MiB':>24} {'no remat MiB':>14}")
  rows = []
  for mm in (pp, 2 * pp, 4 * pp, 8 * pp):
    r = pipeline_grads_temp_bytes(mdef, mesh, plan, mm, per_microbatch=dp, seq=seq, remat=True)
    n = pipeline_grads_temp_bytes(mdef, mesh, plan, mm, per_microbatch=dp, seq=seq, remat=False)
    rows.append((r, n))
    print(f"{mm:>4} {r / 2**20:>24.2f} {n / 2**20:>14.2f}")
  (r0, n0), (r1, n1) = rows[0], rows[-1]
  print(f"growth m={pp}->{8 * pp}: remat +{(r1 - r0) / 2**20:.2f} MiB, no remat +{(n1 - n0) / 2**20:.2f} MiB "
        f"({(n1 - n0) / max(r1 - r0, 1):.1f}x)")


if __name__ == "__main__":
  main()
