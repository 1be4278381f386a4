"""Pipeline benchmark (PP x vPP, GPipe order vs interleaved 1F1B) on the emulated 8-device CPU mesh.

  python benchmarks/bench_pipeline.py [--steps 5] [--quick]

Four tables, all from one process (run times: benchmarks/README.md). --quick: tiny sizes, m=4 only
in table 2, m in (2, 8) and the remat columns only in table 3, no GPipe row in 4.

1. Schedules (no compiling): for pp in (2, 4), vpp in (1, 2), m in (pp, 2pp, 8pp), both kinds of
   jaxllm.parallel.schedule: ticks, the forward-slot bubble read from the tick tables (Schedule.bubble)
   next to the formula (pp-1)/(m*vpp+pp-1), 1F1B's delay and stashed chunk inputs per stage (n_stash)
   against the m*vpp tick inputs GPipe order keeps; plus one rendered chart (1f1b, pp=2 vpp=2 m=4).
2. Train step time (AdamW step included; make_train_step with the Pipeline, state from init_state with
   layout=Layout.of(plan)) of a dense model on pp=2 vpp=2 dp=2 tp=2, GPipe vs 1F1B at equal m, and the
   non-pipelined dp=4 x tp=2 step as the baseline, at one global batch; configs timed round-robin so
   host noise hits all alike; median ms, 1F1B/GPipe ratio, and the first step's loss (all configs
   start from the same weights and batch, so it must agree).
3. Compiled temp memory per device (compiled_temp_bytes on abstract inputs; nothing runs) of the
   pipelined gradients against m at a fixed microbatch size, GPipe and 1F1B each with and without
   Pipeline(remat=...): GPipe order keeps something per tick (grows with m), 1F1B a fixed stash of
   n_stash chunk inputs (remat) or chunk vjp residuals (no remat) per stage (flat in m).
4. MoE in stages: per-device bytes moved by collectives per train step (bench_folding.collective_bytes
   on the compiled HLO, by collective kind, loop trip counts included) of a tiny MoE model on
   pp=2 vpp=2 dp=2 tp=2 ep=4 (1F1B and GPipe) against the same model, same global batch, without
   pipeline on one stage's folding (dp=2 tp=2 ep=4 on 4 devices).

On emulated CPU devices all 8 "devices" share the host's cores: idle (bubble) slots cost nothing
(lax.cond skips them) and wall time tracks total work, not the critical path, so the pipeline bubble
does not show in step time here; tables 1, 3 and 4 are what transfer to a real mesh.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_folding import COLLECTIVES, collective_bytes  # noqa: E402

from jaxllm.config import MeshConfig, ModelConfig, TrainConfig  # noqa: E402
from jaxllm.model.params import model_def  # noqa: E402
from jaxllm.parallel import mesh_hooks  # noqa: E402
from jaxllm.parallel import pipeline as pl  # noqa: E402
from jaxllm.parallel.mesh import build_mesh  # noqa: E402
from jaxllm.parallel.schedule import make_schedule, render  # noqa: E402
from jaxllm.parallel.sharding import batch_sharding  # noqa: E402
from jaxllm.train.metrics import compiled_temp_bytes  # noqa: E402
from jaxllm.train.optim import make_optimizer  # noqa: E402
from jaxllm.train.state import Layout, init_state, state_shardings  # noqa: E402
from jaxllm.train.step import TrainState, grads_and_metrics, make_train_step  # noqa: E402

MiB, KiB = 2**20, 2**10
T0 = time.perf_counter()


def progress(msg):
  """Progress of the slow parts, on stderr (the tables go to stdout)."""
  print(f"  [{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def dense_cfg(n_layers=8, d_model=128, d_ff=384):
  return ModelConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=d_ff)


def moe_cfg(n_layers=4, d_model=128):
  return ModelConfig(
    vocab_size=256,
    d_model=d_model,
    n_layers=n_layers,
    n_heads=4,
    n_kv_heads=2,
    d_ff=384,
    n_experts=8,
    n_experts_per_tok=2,
    moe_d_ff=128,
    shared_expert_d_ff=128,
    shared_expert_gate=True,
  )


def optimizer(mdef):
  return make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0, steps=100), mdef.logical)


def token_batch(vocab, batch, seq, seed=0):
  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


def train_step(mcfg: ModelConfig, mesh_cfg: MeshConfig, devices=None):
  """(jitted train step, state shardings, batch sharding, mesh, plan, tx, layout) for this mesh: through
  the Pipeline when pp > 1 (state in pipeline layout), the model's own forward otherwise."""
  mesh, plan = build_mesh(mesh_cfg, devices)
  mdef = model_def(mcfg)
  tx = optimizer(mdef)
  layout = Layout.of(plan)
  sh = state_shardings(mdef, tx, mesh, plan, layout=layout)
  b_sh = batch_sharding(mesh, plan)
  pipe = pl.Pipeline(mdef, mesh, plan, mesh_cfg.microbatches, mesh_cfg.schedule) if mesh_cfg.pp > 1 else None
  step = make_train_step(mdef, tx, sh, b_sh, hook_kwargs=mesh_hooks(mesh, plan, mcfg), pipeline=pipe)
  return step, sh, b_sh, mesh, plan, tx, layout, mdef


def mesh_label(c: MeshConfig) -> str:
  if c.pp == 1:
    s = f"no pipeline dp={c.dp} tp={c.tp}"
  else:
    s = f"{c.schedule:<5} pp={c.pp} vpp={c.vpp} dp={c.dp} tp={c.tp} m={c.microbatches}"
  return s + (f" ep={c.ep}" if c.ep > 1 else "")


# ---------------------------------------------------------------------------------------------
# 1. Schedules


def schedules_table(quick: bool):
  print("== 1. schedule tables (jaxllm.parallel.schedule; no compiling) ==")
  print(
    "bubble = idle fraction of the (stage, tick) forward slots; formula (pp-1)/(m*vpp+pp-1). 1F1B stashes "
    "n_stash chunk inputs per stage; GPipe order keeps m*vpp tick inputs per stage."
  )
  print(
    f"{'pp':>3} {'vpp':>4} {'m':>4} | {'ticks gpipe':>11} {'ticks 1f1b':>10} | {'bubble gpipe':>12} "
    f"{'bubble 1f1b':>11} {'formula':>8} | {'1f1b delay':>10} {'1f1b n_stash':>12} {'gpipe m*vpp':>11}"
  )
  for pp in (2, 4):
    for vpp in (1, 2):
      for m in (pp, 2 * pp, 8 * pp):
        g, f = make_schedule("gpipe", pp, vpp, m), make_schedule("1f1b", pp, vpp, m)
        formula = (pp - 1) / (m * vpp + pp - 1)
        print(
          f"{pp:>3} {vpp:>4} {m:>4} | {g.ticks:>11} {f.ticks:>10} | {100 * g.bubble:>11.1f}% "
          f"{100 * f.bubble:>10.1f}% {100 * formula:>7.1f}% | {f.delay:>10} {f.n_stash:>12} {m * vpp:>11}"
        )
  print(
    "\n1F1B ticks run one chunk forward and one chunk backward each (fused); GPipe ticks are forwards only, "
    "its backward is the reversed scan."
  )
  print("\nrender(make_schedule('1f1b', pp=2, vpp=2, m=4))   cells: F/B <repeat r><microbatch j>, '...' idle")
  print(render(make_schedule("1f1b", 2, 2, 4)))


# ---------------------------------------------------------------------------------------------
# 2. Train step time


def step_times(steps: int, quick: bool):
  mcfg = dense_cfg(n_layers=4 if quick else 8, d_model=64 if quick else 128, d_ff=192 if quick else 384)
  seq = 32 if quick else 64
  ms = (4,) if quick else (4, 8)
  batch_size = 16 if quick else 32  # one global batch for every config
  configs = [MeshConfig(dp=4, tp=2)]
  for m in ms:
    configs += [MeshConfig(pp=2, vpp=2, dp=2, tp=2, microbatches=m, schedule=k) for k in ("gpipe", "1f1b")]
  print(
    f"\n== 2. train step time (AdamW included): dense d={mcfg.d_model} L={mcfg.n_layers} "
    f"V={mcfg.vocab_size} F={mcfg.d_ff}, global batch {batch_size} x seq {seq}; median of {steps} steps, "
    "configs run round-robin =="
  )
  print(
    "NOTE: the 8 emulated CPU devices share the host's cores (2 here): idle (bubble) slots are skipped by "
    "lax.cond and cost nothing, so wall time tracks total work, not the critical path -- the pipeline "
    "bubble is not visible in these times."
  )
  batch = token_batch(mcfg.vocab_size, batch_size, seq)
  runs = []
  for c in configs:
    progress(f"build + compile + warm up: {mesh_label(c)}")
    step, sh, b_sh, mesh, plan, tx, layout, mdef = train_step(mcfg, c)
    with jax.set_mesh(mesh):
      state = init_state(mdef, tx, sh, seed=0, layout=layout)
      b = jax.device_put(batch, b_sh)
      state, metrics = step(state, b)
      first = float(jax.block_until_ready(metrics)["loss"])
    runs.append({"cfg": c, "step": step, "mesh": mesh, "state": state, "batch": b, "first": first, "t": []})
  progress(f"timing {steps} rounds")
  for _ in range(steps):  # round-robin: load changes on the host hit every config alike
    for r in runs:
      with jax.set_mesh(r["mesh"]):
        t0 = time.perf_counter()
        r["state"], metrics = r["step"](r["state"], r["batch"])
        jax.block_until_ready(metrics)
        r["t"].append(time.perf_counter() - t0)
  med = [1e3 * statistics.median(r["t"]) for r in runs]
  base = med[0]
  print(
    f"{'config':<40} {'ticks':>6} {'bubble':>7} {'step ms':>9} {'min ms':>8} {'/ baseline':>10} "
    f"{'1f1b/gpipe':>10} {'loss step 1':>12}"
  )
  for i, (r, t) in enumerate(zip(runs, med)):
    c = r["cfg"]
    if c.pp > 1:
      s = make_schedule(c.schedule, c.pp, c.vpp, c.microbatches)
      ticks, bub = str(s.ticks), f"{100 * s.bubble:.1f}%"
      ratio = f"{t / med[i - 1]:.2f}" if c.schedule == "1f1b" else ""
    else:
      ticks, bub, ratio = "-", "-", ""
    print(
      f"{mesh_label(c):<40} {ticks:>6} {bub:>7} {t:>9.1f} {1e3 * min(r['t']):>8.1f} {t / base:>10.2f} "
      f"{ratio:>10} {r['first']:>12.5f}"
    )


# ---------------------------------------------------------------------------------------------
# 3. Compiled temp memory against m


def temp_memory(quick: bool):
  mcfg = dense_cfg(n_layers=2 if quick else 4, d_model=64 if quick else 128, d_ff=192 if quick else 384)
  pp, vpp, dp = 2, 1, 4
  per_rank, seq = 2, (32 if quick else 64)
  ms = (2, 8) if quick else (2, 4, 8, 16, 32)
  mdef = model_def(mcfg)
  mesh, plan = build_mesh(MeshConfig(pp=pp, vpp=vpp, dp=dp, microbatches=pp))
  sh = pl.staged_shardings(mdef, mesh, plan)
  abstract = jax.eval_shape(lambda p: pl.staged_params(p, pp, vpp), mdef.abstract_params())
  b_sh = batch_sharding(mesh, plan)
  chunk_in = per_rank * seq * mcfg.d_model * 4  # one stashed chunk input [b, T, D] fp32 per device
  print(
    f"\n== 3. compiled temp memory per device of the pipelined gradients (nothing runs): dense "
    f"d={mcfg.d_model} L={mcfg.n_layers} F={mcfg.d_ff}, pp={pp} vpp={vpp} dp={dp}, fixed microbatch "
    f"{dp * per_rank} seqs x {seq} ({per_rank} per device; one chunk input = {chunk_in / KiB:.0f} KiB) =="
  )
  print(
    "remat: GPipe keeps only each tick's stage input and recomputes the chunk in the backward; 1F1B stashes "
    "each chunk's input (n_stash slots per stage) and recomputes. no remat: GPipe keeps every layer's "
    "activations of every tick; 1F1B stashes the chunk's vjp residuals instead (still n_stash slots)."
  )

  def temp(m, schedule, remat):
    pipe = pl.Pipeline(mdef, mesh, plan, m, schedule, remat=remat)
    tokens = jax.ShapeDtypeStruct((m * dp * per_rank, seq), jnp.int32)
    with jax.set_mesh(mesh):
      fn = jax.jit(
        lambda p, b: grads_and_metrics(mdef, p, b, pipeline=pipe), in_shardings=(sh, b_sh), out_shardings=(sh, None)
      )
      return compiled_temp_bytes(fn, abstract, {"inputs": tokens, "targets": tokens})

  all_cols = [("gpipe", True), ("gpipe", False), ("1f1b", True), ("1f1b", False)]
  cols = [c for c in all_cols if c[1] or not quick]  # --quick: the remat columns only
  print(
    f"{'m':>4} {'gpipe remat':>12} {'gpipe no-remat':>15} {'1f1b remat':>11} {'1f1b no-remat':>14} "
    f"{'1f1b n_stash':>12} {'n_stash x chunk input':>22}   (MiB)"
  )
  rows = {}
  # XLA compiles with the GIL released: two at a time use both host cores.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for m in ms:
      progress(f"compiling temp memory m={m} ({len(cols)} variants)")
      rows[m] = dict(zip(cols, pool.map(lambda c: temp(m, *c), cols)))
      ns = make_schedule("1f1b", pp, vpp, m).n_stash
      g, n, f, fo = (f"{rows[m][c] / MiB:.2f}" if c in rows[m] else "-" for c in all_cols)
      print(f"{m:>4} {g:>12} {n:>15} {f:>11} {fo:>14} {ns:>12} {ns * chunk_in / MiB:>22.2f}", flush=True)
  lo, hi = (4, 32) if not quick else (ms[0], ms[-1])

  def growth(col):
    if col not in cols:
      return "- (full run only)"
    a, b = rows[lo][col], rows[hi][col]
    return f"{b / a:.2f}x ({a / MiB:.2f} -> {b / MiB:.2f} MiB, +{(b - a) / MiB:.2f})"

  print(f"1f1b temp at m={hi} / at m={lo}: remat {growth(('1f1b', True))}, no remat {growth(('1f1b', False))}")
  print(f"gpipe growth m={lo} -> {hi}: remat {growth(('gpipe', True))}, no remat {growth(('gpipe', False))}")


# ---------------------------------------------------------------------------------------------
# 4. MoE in stages: collective bytes


def abstract_state(mdef, tx, sh, layout):
  shapes = jax.eval_shape(
    lambda p: (lambda q: TrainState(q, tx.init(q), jnp.int32(0)))(layout.params_in(p)), mdef.abstract_params()
  )
  return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, sh)


def moe_collectives(quick: bool):
  mcfg = moe_cfg(n_layers=4, d_model=64 if quick else 128)
  m, seq = 4, (32 if quick else 64)
  kinds = ("1f1b",) if quick else ("1f1b", "gpipe")  # --quick: one compile less
  pipe_cfgs = [MeshConfig(pp=2, vpp=2, dp=2, tp=2, ep=4, microbatches=m, schedule=k) for k in kinds]
  batch_size = m * 2 * 2  # 2 sequences per dp rank per microbatch
  ref_cfg = MeshConfig(dp=2, tp=2, ep=4)
  print(
    f"\n== 4. MoE in stages: per-device collective bytes per train step (bench_folding.collective_bytes on "
    f"the compiled HLO; KiB) -- MoE d={mcfg.d_model} L={mcfg.n_layers} E={mcfg.n_experts} "
    f"top-{mcfg.n_experts_per_tok} Fm={mcfg.moe_d_ff} + shared expert, global batch {batch_size} x seq "
    f"{seq}, dropless =="
  )
  print(
    "HLO counts are static: collectives inside a stage's lax.cond branch are counted on every tick, idle "
    "(bubble) ticks included, so pipeline rows are upper bounds; 'a2a busy' scales the all-to-all by the busy "
    "fraction m*vpp/ticks (every all-to-all sits in a chunk branch)."
  )
  head = f"{'config':<44} {'devs':>4} " + " ".join(f"{k:>18}" for k in COLLECTIVES) + f" {'total':>10} {'a2a busy':>9}"
  print(head)
  batch = token_batch(mcfg.vocab_size, batch_size, seq)
  results = []
  for c, devices in [(ref_cfg, jax.devices()[:4])] + [(c, None) for c in pipe_cfgs]:
    progress(f"compiling MoE train step: {mesh_label(c)}")
    step, sh, b_sh, mesh, plan, tx, layout, mdef = train_step(mcfg, c, devices)
    st = abstract_state(mdef, tx, sh, layout)
    b = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b_sh), batch)
    with jax.set_mesh(mesh):
      coll = collective_bytes(step.lower(st, b).compile().as_text())
    a2a = coll.get("all-to-all", 0)
    if c.pp > 1:
      s = make_schedule(c.schedule, c.pp, c.vpp, c.microbatches)
      busy = a2a * c.microbatches * c.vpp / s.ticks
    else:
      busy = a2a
    results.append((c, coll, busy))
    print(
      f"{mesh_label(c):<44} {c.num_devices:>4} "
      + " ".join(f"{coll.get(k, 0) / KiB:>18.1f}" for k in COLLECTIVES)
      + f" {sum(coll.values()) / KiB:>10.1f} {busy / KiB:>9.1f}",
      flush=True,
    )
  (_, ref, ref_busy) = results[0]
  ref_total, ref_a2a = sum(ref.values()), ref.get("all-to-all", 0)
  print(
    "ratios pipeline / no pipeline, per device per step (target: <= 1.5x). A pipeline device holds 1/pp = 1/2 "
    "of the layers and recomputes each chunk's forward in its backward (x1.5 of the no-remat step's "
    "dispatches), so the executed all-to-all should be ~0.75x; the static count adds ticks/(m*vpp)."
  )
  for c, coll, busy in results[1:]:
    tot, a2a = sum(coll.values()), coll.get("all-to-all", 0)
    print(
      f"  {c.schedule:<5}: total {tot / ref_total:.2f}x, all-to-all {a2a / ref_a2a:.2f}x "
      f"(busy-adjusted {busy / ref_busy:.2f}x), total without collective-permute "
      f"{(tot - coll.get('collective-permute', 0)) / ref_total:.2f}x"
    )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=None, help="timed steps per config (default 5; --quick 3)")
  ap.add_argument("--quick", action="store_true", help="tiny sizes, fewer m values (< ~2 minutes)")
  args = ap.parse_args()
  steps = args.steps or (3 if args.quick else 5)
  print(
    f"jax {jax.__version__} {jax.devices()[0].platform} x{len(jax.devices())} on {os.cpu_count()} host cores"
    + (" (--quick)" if args.quick else "")
  )
  schedules_table(args.quick)
  step_times(steps, args.quick)
  temp_memory(args.quick)
  moe_collectives(args.quick)
  progress("done")


if __name__ == "__main__":
  main()
