"""Memory planner: per-device bytes of a training run, estimated without devices.

  python -m jaxllm.planner --model qwen3-30b-a3b --mesh meshes/tpu-v5p-64.toml train.batch_size=256 train.seq_len=4096

Everything is derived from the project's own code on abstract shapes, never from a second copy of its
rules: the mesh from `plan_mesh`, each parameter's placement from `jaxllm.parallel.sharding.param_specs`
(so new sharding rules, e.g. fsdp, are picked up as they land), the optimizer state from `jax.eval_shape`
of the real optax `init`, the pipeline stash from the real schedule tables, and the activations from the
vjp residuals of the real decoder block (`jaxllm.model.transformer.block_forward` under the configured
`model.remat` policy) traced on one device's shard of a microbatch.

What it models, per device (one chip of the mesh):
  parameters   fp32 (model.param_dtype) master weights: each array's shard shape under its
               PartitionSpec (ceil division over the mesh axes of each sharded dim).
  gradients    one gradient per parameter, in the parameter dtype, sharded like it; twice that with
               train.grad_accum > 1 (the accumulator and the current micro-step's gradients).
  optimizer    AdamW mu and nu following their parameter (optax state from eval_shape; counts replicated).
  batch        the int32 inputs/targets rows this device holds.
  activations  for one micro-step of B/(dp*grad_accum) sequences (pipeline: per microbatch B/(dp*grad_accum*m)):
               - saved: what the layer scan keeps for the backward, L/pp layers x the block's residuals
                 under model.remat ('none': every residual, 'dots': matmul outputs, 'full': the layer input);
                 pipeline 1F1B: n_stash chunk inputs (remat=full) or n_stash chunks' residuals, plus the
                 forward/backward ring banks (jaxllm.parallel.schedule); GPipe: every tick's;
               - backward of one layer (pipeline: of one chunk): its full residual set when remat recomputes
                 it, or gradient temporaries of 0.75x that set (GRAD_TEMP), plus with blockwise attention
                 three fp32 score tiles [b, N/tp, block_q, block_k] of its backward (FLASH_BWD_TILES);
                 the naive attention (model.attention=xla) keeps fp32 scores [b, K, G, T, S] instead,
                 which the residuals show; 'auto' is resolved for the mesh's device, and the kernels that
                 cannot be traced off-device (splash, cudnn) are traced as the blockwise XLA version;
               - head: the loss's residuals and one chunk's (model.loss_chunk) or the whole sequence's fp32
                 logits [b, T, V/tp] and their gradient;
               - MoE: the dropless dispatch buffers of jaxllm.parallel.moe ([ep, n_own*min(k, E/ep), D]
                 send/receive rows and the expert hidden rows), traced with the block.
               The peak is saved + max(one layer's backward, the head's).
  fsdp         when the mesh shards parameters over data-parallel axes, one layer's gathered weights
               (forward and backward) and the gathered embedding/head are added as transients.

The estimate is validated against XLA's compiled memory analysis of the real jitted train step
(tests/planner/test_planner.py): `predicted total` vs `argument + output - alias + temp` of the compiled step.

Modules: shapes.py (placements and state bytes), activations.py (traced residuals), this one (the
estimate, device memory, suggestions, the table and the CLI; `python -m jaxllm.planner`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from jaxllm.planner.activations import _model_def, activation_bytes, microbatch_rows
from jaxllm.planner.shapes import shard_shape, state_bytes

__all__ = [
  "Estimate",
  "estimate",
  "device_memory_bytes",
  "suggestions",
  "combined_plan",
  "format_estimate",
  "format_suggestions",
  "main",
  "shard_shape",
  "GiB",
]

GiB = 1024**3

# Memory per device, GiB, by chip (matched against the mesh name); `--device-memory` overrides.
DEVICE_MEMORY_GIB = {
  "tpu-v5e": 16.0,
  "tpu-v5litepod": 16.0,
  "tpu-v5p": 95.0,
  "tpu-v6e": 32.0,
  "tpu-v4": 32.0,
  "h100": 80.0,
  "h200": 141.0,
  "a100": 80.0,
  "b200": 192.0,
}


@dataclass
class Estimate:
  """Per-device bytes of one training configuration."""

  cfg: object  # jaxllm.config.Config
  params: int
  grads: int
  opt_state: int
  batch: int
  activations: dict[str, int]  # saved / layer_backward / head / fsdp_gather / ... (components)
  device_memory: float | None  # bytes per device, None when unknown
  device_label: str = ""
  notes: list[str] = field(default_factory=list)

  @property
  def activation_peak(self) -> int:
    a = self.activations
    return a["saved"] + a.get("banks", 0) + max(a["layer_backward"], a["head"]) + a.get("fsdp_gather", 0)

  @property
  def arguments(self) -> int:
    """What the step takes as arguments: the train state and the batch (compiled: argument_size)."""
    return self.params + self.opt_state + self.batch

  @property
  def temporaries(self) -> int:
    """Gradients and activations (compiled: temp_size)."""
    return self.grads + self.activation_peak

  @property
  def total(self) -> int:
    return self.arguments + self.temporaries

  @property
  def fits(self) -> bool | None:
    return None if self.device_memory is None else self.total <= self.device_memory


# ---------------------------------------------------------------------------------------------
# The estimate


def device_memory_bytes(mesh_cfg, override_gib: float | None = None) -> tuple[float | None, str]:
  """(bytes per device, label) from --device-memory, else the chip the mesh name names, else host RAM
  on CPU meshes; (None, 'n/a') when unknown."""
  if override_gib is not None:
    return override_gib * GiB, f"{override_gib:g} GiB (given)"
  name = mesh_cfg.name.lower()
  for chip, gib in sorted(DEVICE_MEMORY_GIB.items(), key=lambda kv: -len(kv[0])):
    if name.startswith(chip) or f"-{chip}" in name or chip.replace("-", "") in name.replace("-", ""):
      return gib * GiB, f"{chip} {gib:g} GiB"
  if mesh_cfg.device == "cpu":
    try:
      total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
      return float(total), f"host RAM {total / GiB:.1f} GiB (shared by all {mesh_cfg.num_devices} CPU devices)"
    except (ValueError, OSError, AttributeError):
      pass
  return None, "n/a"


def estimate(cfg, device_memory_gib: float | None = None) -> Estimate:
  """Per-device memory of training `cfg` (a jaxllm.config.Config); no devices needed."""
  import numpy as np

  from jaxllm.parallel.mesh import plan_mesh
  from jaxllm.train.optim import make_optimizer

  plan = plan_mesh(cfg.mesh)
  mdef = _model_def(cfg.model)
  tx = make_optimizer(cfg.train, mdef.logical)
  params, opt = state_bytes(mdef, tx, plan)
  grads = params * (2 if cfg.train.grad_accum > 1 else 1)
  rows = cfg.train.batch_size // cfg.mesh.dp
  batch = 2 * rows * cfg.train.seq_len * np.dtype(np.int32).itemsize
  acts, notes = activation_bytes(cfg, mdef, plan)
  mem, label = device_memory_bytes(cfg.mesh, device_memory_gib)
  return Estimate(cfg, params, grads, opt, batch, acts, mem, label, notes)


def with_overrides(cfg, overrides: list[str]):
  """`cfg` with `section.key=value` overrides applied (validated like the command line)."""
  from jaxllm.config import load_config

  return load_config([], overrides, base=cfg)


def candidate_changes(cfg) -> list[tuple[str, list[str]]]:
  """Knobs worth trying when a configuration does not fit: (description, overrides). Each keeps the
  global batch except the last (halving it changes the training recipe)."""
  m, t, mc = cfg.mesh, cfg.train, cfg.model
  out = []
  if mc.remat != "full":
    out.append(("recompute each layer (model.remat=full)", ["model.remat=full"]))
  if mc.remat == "none":
    out.append(("keep only matmul outputs (model.remat=dots)", ["model.remat=dots"]))
  ga = t.grad_accum * 2
  if t.batch_size % ga == 0:
    out.append((f"accumulate over {ga} micro-steps (train.grad_accum={ga})", [f"train.grad_accum={ga}"]))
  if m.pp > 1:
    mb = m.microbatches * 2
    out.append((f"smaller pipeline microbatches (mesh.microbatches={mb})", [f"mesh.microbatches={mb}"]))
    if mc.n_layers % (m.pp * m.vpp * 2) == 0:
      out.append((f"smaller pipeline chunks (mesh.vpp={m.vpp * 2})", [f"mesh.vpp={m.vpp * 2}"]))
  if getattr(m, "fsdp", m.dp) < m.dp:
    out.append(
      (
        f"shard params, grads and Adam state over all {m.dp} data-parallel ways (mesh.fsdp={m.dp})",
        [f"mesh.fsdp={m.dp}"],
      )
    )
  if m.dp % 2 == 0:
    fs = [f"mesh.fsdp={max(getattr(m, 'fsdp', 1) // 2, 1)}"] if getattr(m, "fsdp", 1) > 1 else []
    out.append(
      (
        f"trade dp for tp (mesh.dp={m.dp // 2} mesh.tp={m.tp * 2})",
        [f"mesh.dp={m.dp // 2}", f"mesh.tp={m.tp * 2}", *fs],
      )
    )
    if mc.n_layers % (2 * m.pp * m.vpp) == 0:
      mb = max(m.microbatches, 2 * m.pp)
      out.append(
        (
          f"trade dp for pipeline stages (mesh.dp={m.dp // 2} mesh.pp={m.pp * 2} mesh.microbatches={mb})",
          [f"mesh.dp={m.dp // 2}", f"mesh.pp={m.pp * 2}", f"mesh.microbatches={mb}", *fs],
        )
      )
  if t.batch_size >= 2:
    out.append(
      (f"halve the global batch (train.batch_size={t.batch_size // 2})", [f"train.batch_size={t.batch_size // 2}"])
    )
  return out


@dataclass
class Option:
  """A suggested change, re-estimated."""

  description: str
  overrides: list[str]
  estimate: Estimate


def suggestions(cfg, device_memory_gib: float | None = None) -> list[Option]:
  """Each candidate change re-estimated, smallest total first. Changes the config rejects
  (indivisible sizes, ...) are skipped."""
  from jaxllm.config import ConfigError
  from jaxllm.parallel.mesh import plan_mesh

  out = []
  for desc, ov in candidate_changes(cfg):
    try:
      new = with_overrides(cfg, ov)
      plan_mesh(new.mesh)
      out.append(Option(desc, ov, estimate(new, device_memory_gib)))
    except (ConfigError, ValueError):
      continue
  return sorted(out, key=lambda o: o.estimate.total)


def combined_plan(
  cfg, options: list[Option], device_memory_gib: float | None = None, rounds: int = 4
) -> tuple[list[str], Estimate] | None:
  """When no single change fits: apply the best change that keeps the global batch, re-estimate the
  candidates from there, and repeat (greedy, at most `rounds` changes).
  -> (the overrides, in order; a later one of the same key wins), the final Estimate) or None."""
  keep = lambda opts: [o for o in opts if not o.overrides[0].startswith("train.batch_size")]
  options = keep(options)
  if not options or options[0].estimate.fits is not False:
    return None
  overrides, current = list(options[0].overrides), options[0].estimate
  for _ in range(rounds - 1):
    nxt = keep(suggestions(current.cfg, device_memory_gib))
    if not nxt or nxt[0].estimate.total >= current.total:
      break
    overrides += nxt[0].overrides
    current = nxt[0].estimate
    if current.fits:
      break
  final = {}
  for o in overrides:
    k, v = o.split("=", 1)
    final.pop(k, None)
    final[k] = v
  return [f"{k}={v}" for k, v in final.items()], current


def _gib(x: float) -> str:
  return f"{x / GiB:9.2f}"


def format_estimate(est: Estimate) -> str:
  c = est.cfg
  m, t, mc = c.mesh, c.train, c.model
  counts = mc.param_counts()
  fsdp = getattr(m, "fsdp", None)
  lines = [
    f"model {mc.name}: {counts['total'] / 1e9:.2f}B params ({counts['active'] / 1e9:.2f}B active), "
    f"dtype {mc.dtype}, params {mc.param_dtype}, remat {mc.remat}",
    f"mesh {m.name} ({m.device}, {m.num_devices} devices): pp={m.pp} vpp={m.vpp} dp={m.dp} tp={m.tp} "
    f"ep={m.ep} etp={m.etp}"
    + (f" fsdp={fsdp}" if fsdp is not None else "")
    + (f" microbatches={m.microbatches} {m.schedule}" if m.pp > 1 else ""),
    f"train: batch_size={t.batch_size} seq_len={t.seq_len} grad_accum={t.grad_accum} -> "
    f"{microbatch_rows(c)} sequences per device per forward",
  ]
  lines += [f"  {n}" for n in est.notes]
  a = est.activations
  rows = [
    ("parameters (master)", est.params),
    ("gradients", est.grads),
    ("optimizer state (Adam mu, nu)", est.opt_state),
    ("batch", est.batch),
    ("activations, saved for backward", a["saved"] + a.get("banks", 0)),
    ("activations, backward of a layer" + ("" if c.mesh.pp == 1 else " chunk"), a["layer_backward"]),
    ("activations, logits + loss (fp32)", a["head"]),
  ]
  if "fsdp_gather" in a:
    rows.append(("fsdp gathered weights", a["fsdp_gather"]))
  lines.append(f"{'per device':<40}{'GiB':>9}")
  lines += [f"  {name:<38}{_gib(v)}" for name, v in rows]
  lines.append(f"  {'activation peak (saved + larger)':<38}{_gib(est.activation_peak)}")
  lines.append(f"  {'total':<38}{_gib(est.total)}")
  if est.device_memory is None:
    lines.append("device memory: n/a (pass --device-memory GiB)")
  else:
    verdict = "fits" if est.fits else "DOES NOT FIT"
    lines.append(f"device memory: {est.device_label}: {verdict} ({100 * est.total / est.device_memory:.0f}% used)")
  return "\n".join(lines)


def format_suggestions(options: list[Option], combined=None, limit: int = 6) -> str:
  if not options:
    return "no single change from the list (remat, grad_accum, microbatches, fsdp, tp, pp, batch) is valid here"
  lines = ["changes that would help (each re-estimated):"]
  for o in options[:limit]:
    e = o.estimate
    verdict = "" if e.fits is None else ("  fits" if e.fits else "  still too big")
    lines.append(f"  {o.description}: {e.total / GiB:.2f} GiB{verdict}")
  if combined:
    overrides, e = combined
    verdict = "fits" if e.fits else "still too big"
    lines.append(f"  together (global batch kept): {' '.join(overrides)}: {e.total / GiB:.2f} GiB, {verdict}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m jaxllm.planner",
    description="Per-device memory of a training run (parameters, gradients, optimizer state, activations), "
    "estimated on abstract shapes: no devices needed.",
    epilog="overrides: section.key=value, e.g. train.batch_size=64 train.seq_len=4096 model.remat=full mesh.tp=4",
  )
  parser.add_argument("--model", help="model preset (same as model=NAME)")
  parser.add_argument("--mesh", help="mesh preset TOML (meshes/*.toml)")
  parser.add_argument("--config", action="append", default=[], help="TOML config file(s)")
  parser.add_argument(
    "--device-memory",
    type=float,
    default=None,
    metavar="GiB",
    help="memory per device; default from the mesh's chip (TPU v5e 16, v5p 95, v6e 32, H100 80, H200 141)",
  )
  parser.add_argument("--no-suggest", action="store_true", help="skip the re-estimated suggestions")
  parser.add_argument("overrides", nargs="*", help="section.key=value")
  args = parser.parse_args(argv)

  from jaxllm.config import ConfigError, load_config

  overrides = (
    ([f"model={args.model}"] if args.model else [])
    + ([f"mesh={args.mesh}"] if args.mesh else [])
    + list(args.overrides)
  )
  try:
    cfg = load_config(args.config, overrides)
    from jaxllm.parallel.mesh import plan_mesh

    plan_mesh(cfg.mesh)
    est = estimate(cfg, args.device_memory)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_estimate(est))
  if est.fits is False and not args.no_suggest:
    options = suggestions(cfg, args.device_memory)
    print(format_suggestions(options, combined_plan(cfg, options, args.device_memory)))
  return 0
