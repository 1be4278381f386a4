"""MoE Parallel Folding benchmark on the emulated 8-device CPU mesh: for each folding of the same
8 devices (attention dp x tp | experts edp x ep x etp), one full train step of tiny-moe (AdamW),
side by side with the single-device step as the baseline:

  python benchmarks/bench_folding.py [--steps 5] [--batch 16] [--seq 128] [--model tiny-moe]
                                     [--capacity-factor 1.25]

Columns: median step time, tokens/s, and the collective bytes per device per step read from the
compiled HLO (operand sizes of all-to-all / all-reduce / all-gather / reduce-scatter /
collective-permute, multiplied by the trip counts of the while loops around them, e.g. the layer
scan), plus the first step's loss (identical across dropless foldings up to fp32 reassociation).
The last row is the dropless ep=8 folding again with the capacity-factor option (lower loss
agreement is expected there: slots over capacity are dropped).
The 8 emulated devices share the host's cores, so step time here measures overhead and
collective count, not the speedup a real mesh would see.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.config import MODEL_PRESETS, MeshConfig, TrainConfig  # noqa: E402
from jaxllm.model.params import model_def  # noqa: E402
from jaxllm.parallel import build_mesh, mesh_hooks  # noqa: E402
from jaxllm.parallel.sharding import batch_sharding  # noqa: E402
from jaxllm.train.metrics import time_train_steps  # noqa: E402
from jaxllm.train.optim import make_optimizer  # noqa: E402
from jaxllm.train.state import init_state, state_shardings  # noqa: E402
from jaxllm.train.step import make_train_step  # noqa: E402

#            dp tp  ep etp
FOLDINGS = [
  (4, 2, 1, 1),
  (4, 2, 8, 1),
  (2, 4, 4, 2),
  (4, 2, 4, 1),
  (8, 1, 2, 1),
  (1, 8, 8, 1),
  (2, 4, 2, 2),
  (8, 1, 8, 1),
]
COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
_DTYPE_BYTES = {
  "f64": 8,
  "s64": 8,
  "u64": 8,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "s8": 1,
  "u8": 1,
  "pred": 1,
}
_ARRAY = re.compile(r"\b(f64|s64|u64|f32|s32|u32|bf16|f16|s16|u16|s8|u8|pred)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")


def _bytes(shape_text: str) -> int:
  return sum(
    _DTYPE_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    for t, dims in _ARRAY.findall(shape_text)
  )


def collective_bytes(hlo: str) -> dict[str, int]:
  """Per-device bytes moved by each collective kind in one execution of a compiled SPMD module:
  the operand sizes of every collective, times the trip counts of enclosing while loops."""
  size, per_comp, calls, entry, comp = {}, defaultdict(lambda: defaultdict(int)), defaultdict(list), None, None
  lines = hlo.splitlines()
  for line in lines:  # pass 1: every value's size
    m = _INSTR.match(line)
    if m:
      size[m.group(1)] = _bytes(m.group(2))
  for line in lines:  # pass 2: collectives and the call graph
    h = _HEADER.match(line)
    if h:
      comp = h.group(1)
      entry = comp if line.startswith("ENTRY") else entry
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    op, rest = m.group(3), m.group(4)
    kind = op[:-6] if op.endswith("-start") else op
    if kind in COLLECTIVES:
      operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
      per_comp[comp][kind] += sum(size.get(o, 0) for o in operands)
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
    for attr, callee in re.findall(r"\b(body|condition|calls|to_apply)=%([\w.\-]+)", rest):
      calls[comp].append((callee, int(trips.group(1)) if attr == "body" and trips else 1))
    for group in re.findall(r"branch_computations=\{([^}]*)\}", rest):
      calls[comp] += [(c, 1) for c in re.findall(r"%([\w.\-]+)", group)]
  total = defaultdict(int)

  def visit(c, mult):
    for kind, b in per_comp[c].items():
      total[kind] += b * mult
    for callee, n in calls[c]:
      visit(callee, mult * n)

  visit(entry, 1)
  return dict(total)


def run(mesh_cfg: MeshConfig, mcfg, batch_size: int, seq: int, steps: int, devices, capacity_factor=0.0):
  mesh, plan = build_mesh(mesh_cfg, devices)
  mdef = model_def(mcfg)
  tx = make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0, steps=100), mdef.logical)
  sh = state_shardings(mdef, tx, mesh, plan)
  b_sh = batch_sharding(mesh, plan)
  state = init_state(mdef, tx, sh, seed=0)
  step = make_train_step(mdef, tx, sh, b_sh, hook_kwargs=mesh_hooks(mesh, plan, mcfg, capacity_factor))
  tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size, (batch_size, seq + 1)).astype(np.int32)
  batch = jax.device_put({"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}, b_sh)
  compiled = step.lower(state, batch).compile()
  coll = collective_bytes(compiled.as_text())
  dt, _, first = time_train_steps(compiled, state, batch, steps)
  return dt, coll, float(first["loss"])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--model", default="tiny-moe")
  ap.add_argument("--capacity-factor", type=float, default=1.25)
  args = ap.parse_args()
  mcfg = MODEL_PRESETS[args.model]
  tokens = args.batch * args.seq
  print(
    f"jax {jax.__version__} {jax.devices()[0].platform} x{len(jax.devices())}; model {mcfg.name} "
    f"(L={mcfg.n_layers} D={mcfg.d_model} E={mcfg.n_experts} top-{mcfg.n_experts_per_tok} "
    f"Fm={mcfg.resolved_moe_d_ff}); batch {args.batch} x seq {args.seq} = {tokens} tokens/step; "
    f"median of {args.steps} steps"
  )
  head = (
    f"{'folding (attn | moe)':<28} {'step ms':>8} {'tokens/s':>9} {'first loss':>10}  "
    + " ".join(f"{k:>14}" for k in COLLECTIVES)
    + f" {'total KiB':>10}"
  )
  print("collective bytes per device per step, KiB\n" + head)
  rows = [("1 device (baseline)", MeshConfig(), jax.devices()[:1], 0.0)]
  rows += [
    (
      f"tp={tp} dp={dp} | ep={ep} etp={etp} edp={dp * tp // (ep * etp)}",
      MeshConfig(dp=dp, tp=tp, ep=ep, etp=etp),
      jax.devices(),
      0.0,
    )
    for dp, tp, ep, etp in FOLDINGS
  ]
  # The capacity-factor option: smaller exchange buffers, tokens over capacity dropped.
  rows += [
    (f"tp=2 dp=4 | ep=8 cf={args.capacity_factor}", MeshConfig(dp=4, tp=2, ep=8), jax.devices(), args.capacity_factor)
  ]
  for label, mc, devices, cf in rows:
    t, coll, loss = run(mc, mcfg, args.batch, args.seq, args.steps, devices, cf)
    print(
      f"{label:<28} {1e3 * t:>8.1f} {tokens / t:>9.0f} {loss:>10.5f}  "
      + " ".join(f"{coll.get(k, 0) / 1024:>14.1f}" for k in COLLECTIVES)
      + f" {sum(coll.values()) / 1024:>10.1f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
