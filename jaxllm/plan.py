"""Memory planner: per-device bytes of a training run, estimated without devices.

  python -m jaxllm.plan --model qwen3-30b-a3b --mesh meshes/tpu-v5p-64.toml train.batch_size=256 train.seq_len=4096

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
(tests/test_plan.py): `predicted total` vs `argument + output - alias + temp` of the compiled step.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from dataclasses import dataclass, field

GiB = 1024 ** 3
# Gradient temporaries of one layer's backward, as a fraction of its full residual set (calibrated
# against XLA's buffer assignment of the compiled train step, tests/test_plan.py).
GRAD_TEMP = 0.75
# fp32 score tiles alive at once in the backward of blockwise (flash) attention (same calibration).
FLASH_BWD_TILES = 3

# Memory per device, GiB, by chip (matched against the mesh name); `--device-memory` overrides.
DEVICE_MEMORY_GIB = {"tpu-v5e": 16.0, "tpu-v5litepod": 16.0, "tpu-v5p": 95.0, "tpu-v6e": 32.0, "tpu-v4": 32.0,
                     "h100": 80.0, "h200": 141.0, "a100": 80.0, "b200": 192.0}


@dataclass
class Estimate:
  """Per-device bytes of one training configuration."""
  cfg: object                      # jaxllm.config.Config
  params: int
  grads: int
  opt_state: int
  batch: int
  activations: dict[str, int]      # saved / layer_backward / head / fsdp_gather / ... (components)
  device_memory: float | None      # bytes per device, None when unknown
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
# Shapes and placements

def axis_sizes(plan) -> dict[str, int]:
  return dict(zip(plan.axis_names, plan.axis_sizes))


def _entry_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape, spec, sizes: dict[str, int]) -> tuple[int, ...]:
  """One device's shard of an array of `shape` under PartitionSpec `spec` (ceil division per dim)."""
  spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  return tuple(-(-d // math.prod(sizes[a] for a in _entry_axes(e))) for d, e in zip(shape, spec))


def nbytes(shape, dtype) -> int:
  import numpy as np
  return int(math.prod(shape)) * np.dtype(dtype).itemsize


def _is_spec(x) -> bool:
  from jax.sharding import PartitionSpec
  return isinstance(x, PartitionSpec)


def state_bytes(mdef, tx, plan) -> tuple[int, int]:
  """(parameter bytes, optimizer-state bytes) per device. Placement: `param_specs` (on the canonical
  [L, ...] shapes: the layer dim split over pp holds the same bytes per device as the pipeline layout
  [vpp, pp, C, ...] the train state keeps); optimizer moments follow their parameter, the rest is
  replicated (as jaxllm.parallel.sharding.opt_state_shardings places them)."""
  import jax
  import optax
  from jax.sharding import PartitionSpec as P
  from jaxllm.parallel.sharding import param_specs

  sizes = axis_sizes(plan)
  abstract = mdef.abstract_params()
  specs = param_specs(mdef, plan)
  per = lambda a, s: nbytes(shard_shape(a.shape, s, sizes), a.dtype)
  params = sum(jax.tree.leaves(jax.tree.map(per, abstract, specs, is_leaf=_is_spec)))
  opt_abstract = jax.eval_shape(tx.init, abstract)
  opt_specs = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, specs,
                                    transform_non_params=lambda _: P(), is_leaf=_is_spec)
  opt = sum(jax.tree.leaves(jax.tree.map(per, opt_abstract, opt_specs, is_leaf=_is_spec)))
  return params, opt


def compute_shapes(mdef, plan) -> dict:
  """Per-device shapes of the weights as the computation uses them: split over the model-parallel
  axes param_specs gives them (tp, ep, etp), gathered over any axes sharding the `embed` dim (fsdp)
  and without the stacked layer dim's pp split (one layer at a time)."""
  import jax
  from jaxllm.parallel.sharding import param_specs
  sizes = axis_sizes(plan)

  def one(names, a, spec):
    spec = tuple(spec) + (None,) * (len(a.shape) - len(tuple(spec)))
    keep = [None if n in ("embed", "layers") else e for n, e in zip(names, spec)]
    return jax.ShapeDtypeStruct(shard_shape(a.shape, keep, sizes), a.dtype)
  return jax.tree.map(one, mdef.logical, mdef.abstract_params(), param_specs(mdef, plan),
                      is_leaf=lambda x: isinstance(x, tuple) and not _is_spec(x))


def fsdp_axes(mdef, plan) -> set[str]:
  """Mesh axes that split some parameter's `embed` dim (ZeRO-3 style data-parallel sharding)."""
  import jax
  from jaxllm.parallel.manual import fsdp_gathers
  gathers = jax.tree.leaves(fsdp_gathers(mdef, plan), is_leaf=lambda x: isinstance(x, tuple))
  return {a for _, axes in gathers for a in _entry_axes(axes)}


# ---------------------------------------------------------------------------------------------
# Activations: vjp residuals of the real block on one device's shapes

def _local_layer_weights(cfg, plan, weights: dict) -> dict:
  """One layer's compute weights (no L dim). With kv heads replicated over tp > K, keep the one kv
  head this rank's query heads use (as jaxllm.parallel.manual.localize_layer_params does)."""
  import jax
  out = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in weights.items()}
  tp, K = plan.size("tp"), cfg.n_kv_heads
  if tp > 1 and K % tp and tp % K == 0:
    for name in ("wk", "wv", "bk", "bv"):
      if name in out:
        s = out[name].shape
        out[name] = jax.ShapeDtypeStruct((*s[:-2], 1, s[-1]), out[name].dtype)
  return out


def _dispatch_hook(plan):
  """A stand-in for the expert-parallel dispatch with the per-device shapes of
  jaxllm.parallel.moe.device_experts (token ownership over tp, [ep, buf_rows, D] exchange buffers,
  grouped matmuls over the received rows); collectives are shape-preserving and left out."""
  import jax.numpy as jnp
  from jaxllm.parallel.moe import _dispatch
  n_tp, n_ep = plan.size("tp"), plan.size("ep")

  def experts(x, ids, weights, w_gate, w_up, w_down):
    B, T, D = x.shape
    n_own = max(B * T // n_tp, 1)
    xc = x.reshape(B * T, D)[:n_own]
    y = _dispatch(xc, ids.reshape(B * T, -1)[:n_own], weights.reshape(B * T, -1)[:n_own], w_gate, w_up, w_down,
                  ep=(), etp=(), n_ep=n_ep, capacity_factor=0.0)
    return jnp.tile(y, (n_tp, 1)).reshape(B, T, D).astype(x.dtype)     # the all_gather over tp
  return experts


def residual_bytes(fn, *args, exclude=()) -> int:
  """Bytes of what `jax.vjp(fn, *args)` keeps for the backward, minus arrays among `exclude` (weights
  and tables that stay alive anyway), deduplicated; traced abstractly (no devices, no FLOPs)."""
  import jax

  def residuals(*a):
    _, vjp = jax.vjp(fn, *a)
    skip = {id(x) for x in jax.tree.leaves([a[i] for i in exclude])}
    seen, out = set(), []
    for leaf in jax.tree.leaves(vjp):
      if id(leaf) not in skip and id(leaf) not in seen and hasattr(leaf, "shape"):
        seen.add(id(leaf))
        out.append(leaf)
    return out
  return sum(nbytes(s.shape, s.dtype) for s in jax.eval_shape(residuals, *args))


def layer_residuals(cfg, plan, weights: dict, b: int, T: int, policy: str) -> tuple[int, int]:
  """(bytes per layer, loop-invariant bytes) that a scan of decoder layers keeps for its backward on
  one device (b local sequences of T tokens) under remat `policy`, weights excluded. Traced as the
  model runs them, a `lax.scan` of `block_forward` (whose partial evaluation hoists what does not
  change between layers, e.g. the causal mask), once over 1 and once over 2 layers: the difference is
  what each further layer adds."""
  import jax
  import jax.numpy as jnp
  from jaxllm.model import hooks
  from jaxllm.model import layers as ops
  from jaxllm.model.transformer import block_forward, remat

  x = jax.ShapeDtypeStruct((b, T, cfg.d_model), jnp.dtype(cfg.dtype))
  one = _local_layer_weights(cfg, plan, weights)
  hook = {"moe_experts": _dispatch_hook(plan)} if cfg.is_moe and plan.cfg.dp * plan.cfg.tp > 1 else {}

  def run(p, x):
    positions = jnp.zeros((b, T), jnp.int32)
    cos, sin = ops.rope_tables(positions, ops.rope_inv_freq(cfg))

    def body(x, p):
      y, _, aux = block_forward(cfg, p, x, cos, sin, None, 0)
      return y, aux
    with hooks.using(**hook):
      return jax.lax.scan(remat(body, policy), x, p)

  def stacked(n):
    p = {k: jax.ShapeDtypeStruct((n, *v.shape), v.dtype) for k, v in one.items()}
    return residual_bytes(run, p, x, exclude=(0,))
  r1, r2 = stacked(1), stacked(2)
  return r2 - r1, 2 * r1 - r2


def head_residuals(cfg, plan, weights: dict, b: int, T: int) -> int:
  """Bytes of the final norm + head + cross-entropy on one device (vocab split over tp): what the loss
  keeps for its backward plus its backward's working set. With a chunked loss (model.loss_chunk, the
  train step's jaxllm.model.loss.chunked_cross_entropy_sums) that is the kept chunk inputs plus one
  chunk's fp32 logits, their residuals and gradient; without, the whole [b, T, V/tp] logits and gradient."""
  import jax
  import jax.numpy as jnp
  from jaxllm.model import layers as ops
  from jaxllm.model import loss as L

  dt = jnp.dtype(cfg.dtype)
  w = weights["embed"] if cfg.tie_embeddings else weights["lm_head"]
  w = jax.ShapeDtypeStruct(w.shape[::-1] if cfg.tie_embeddings else w.shape, w.dtype)   # [D, V/tp]
  norm = weights["final_norm"]
  chunk = getattr(cfg, "loss_chunk", 0)
  # The pipeline's last stage takes the vocab-parallel loss over whole microbatch sequences.
  chunked = getattr(L, "chunked_cross_entropy_sums", None) if plan.cfg.pp == 1 else None

  def plain(t):
    def loss(h, w, norm):
      hn = ops.rms_norm(h, norm, cfg.norm_eps)
      logits = jnp.einsum("btd,dv->btv", hn, w.astype(dt), preferred_element_type=jnp.float32)
      return L.cross_entropy_sums(logits, jnp.zeros((b, t), jnp.int32))[0]
    h = jax.ShapeDtypeStruct((b, t, cfg.d_model), dt)
    return residual_bytes(loss, h, w, norm, exclude=(1, 2)) + nbytes((b, t, w.shape[-1]), jnp.float32)

  if chunked is None or chunk <= 0 or T <= chunk:
    return plain(T)

  def loss(h, w, norm):
    return chunked(ops.rms_norm(h, norm, cfg.norm_eps), w, jnp.zeros((b, T), jnp.int32), None, chunk)[0]
  h = jax.ShapeDtypeStruct((b, T, cfg.d_model), dt)
  return residual_bytes(loss, h, w, norm, exclude=(1, 2)) + plain(chunk)


def traced_model_cfg(model_cfg, mesh_cfg):
  """The model config whose block the planner traces: `model.attention='auto'` resolved for the mesh's
  device kind (cudnn on GPU, splash on TPU, flash otherwise), and the kernels that cannot be traced
  off their device (cudnn, splash) stood in for by `flash`, the same blockwise algorithm whose
  residuals (output and log-sum-exp) are linear in T. 'offload' keeps its saved matmul outputs in host
  memory: on the device it keeps what 'full' keeps."""
  changes = {}
  impl = getattr(model_cfg, "attention", None)
  if impl is not None:
    if impl == "auto":
      impl = {"gpu": "cudnn", "tpu": "splash"}.get(mesh_cfg.device, "flash")
    if impl in ("cudnn", "splash"):
      impl = "flash"
    changes["attention"] = impl
  if model_cfg.remat == "offload":
    changes["remat"] = "full"
  return dataclasses.replace(model_cfg, **changes) if changes else model_cfg


@functools.lru_cache(maxsize=64)
def _model_def(model_cfg):
  from jaxllm.model.params import model_def
  return model_def(model_cfg)


@functools.lru_cache(maxsize=256)
def _layer_residuals_cached(model_cfg, mesh_cfg, b: int, T: int, policy: str) -> tuple[int, int]:
  from jaxllm.parallel.mesh import plan_mesh
  plan = plan_mesh(mesh_cfg)
  return layer_residuals(model_cfg, plan, compute_shapes(_model_def(model_cfg), plan)["layers"], b, T, policy)


@functools.lru_cache(maxsize=256)
def _head_residuals_cached(model_cfg, mesh_cfg, b: int, T: int) -> int:
  from jaxllm.parallel.mesh import plan_mesh
  plan = plan_mesh(mesh_cfg)
  return head_residuals(model_cfg, plan, compute_shapes(_model_def(model_cfg), plan), b, T)


def microbatch_rows(cfg) -> int:
  """Sequences per device in one forward/backward: B / (dp * grad_accum * pipeline microbatches)."""
  t, m = cfg.train, cfg.mesh
  micro = m.microbatches if m.pp > 1 else 1
  return max(t.batch_size // (m.dp * t.grad_accum * micro), 1)


def activation_bytes(cfg, mdef, plan) -> tuple[dict[str, int], list[str]]:
  """Components of the activation peak (see the module docstring)."""
  import jax
  from jaxllm.parallel.schedule import make_schedule

  mesh = cfg.mesh
  mc = traced_model_cfg(cfg.model, mesh)
  weights = compute_shapes(mdef, plan)
  b, T, D = microbatch_rows(cfg), cfg.train.seq_len, mc.d_model
  x_bytes = nbytes((b, T, D), mc.dtype)
  none, none_inv = _layer_residuals_cached(mc, mesh, b, T, "none")
  per, inv = (none, none_inv) if mc.remat == "none" else _layer_residuals_cached(mc, mesh, b, T, mc.remat)
  notes = []
  if getattr(cfg.model, "attention", None) is not None:
    chunked = getattr(mc, "loss_chunk", 0) and mesh.pp == 1 and cfg.train.seq_len > mc.loss_chunk
    notes.append(f"attention {cfg.model.attention}" + (f" (traced as {mc.attention})" if mc.attention != cfg.model.attention else "")
                 + (f", loss in chunks of {mc.loss_chunk} positions" if chunked else ", loss over whole sequences"))
  if cfg.model.remat == "offload":
    notes.append("remat offload: the saved matmul outputs sit in host memory, not counted here")
  out = {}
  # The backward of one layer: its residuals recomputed (remat) and the gradient temporaries. In a
  # dense layer XLA reuses the recomputed buffers for the gradients as the backward consumes them (the
  # larger of the two is live); the MoE dispatch's gathers and scatters keep both alive.
  grad_tmp = int(GRAD_TEMP * none)
  combine = (lambda r, g: r + g) if mc.is_moe else max
  out["head"] = _head_residuals_cached(mc, mesh, b, T)
  if mesh.pp == 1:
    out["saved"] = mc.n_layers * per + inv
    out["layer_backward"] = combine(none + none_inv - inv if mc.remat != "none" else 0, grad_tmp)
  else:
    sched = make_schedule(mesh.schedule, mesh.pp, mesh.vpp, mesh.microbatches)
    C = mc.n_layers // (mesh.pp * mesh.vpp)
    pipe_remat = cfg.model.remat == "full"     # the Pipeline's chunk-level remat (jaxllm.train.loop.build_steps)
    if pipe_remat:
      # Each stashed item is a chunk input; the backward recomputes the C layers of one chunk.
      chunk = x_bytes
      out["layer_backward"] = combine(C * none + none_inv, grad_tmp)
    else:
      # Each stashed item is the chunk's vjp residuals (C layers under the per-layer policy), stored
      # as they are; a tick's forward makes one more set while its backward runs.
      chunk = C * per + inv
      out["layer_backward"] = chunk + combine(C * none + none_inv if mc.remat != "none" else 0, grad_tmp)
    kept = sched.n_stash if mesh.schedule == "1f1b" else sched.ticks
    out["saved"] = kept * chunk
    out["banks"] = (sched.n_fbank + sched.n_gbank + 4) * x_bytes
    notes.append(f"pipeline {mesh.schedule} pp={mesh.pp} vpp={mesh.vpp} m={mesh.microbatches}: {kept} "
                 f"{'stashed ' if mesh.schedule == '1f1b' else ''}chunk "
                 f"{'inputs' if pipe_remat else 'residual sets'} of {C} layers per stage")
  if getattr(mc, "attention", None) == "flash":
    # The blockwise backward recomputes each (query block, key block) tile: scores, probabilities and
    # their gradients, fp32 [b, N/tp, block_q, block_k] each, next to the layer's other gradients.
    from jaxllm.model import attention as A
    heads = weights["layers"]["wq"].shape[2]
    tile = nbytes((b, heads, min(getattr(A, "BLOCK_Q", T), T), min(getattr(A, "BLOCK_K", T), T)), "float32")
    out["layer_backward"] += FLASH_BWD_TILES * tile
  gathered = fsdp_axes(mdef, plan)
  if gathered:
    sizes = axis_sizes(plan)
    one_layer = sum(nbytes(a.shape[1:], a.dtype) for a in jax.tree.leaves(weights["layers"]))
    rest = sum(nbytes(a.shape, a.dtype) for k, v in weights.items() if k != "layers" for a in jax.tree.leaves(v))
    out["fsdp_gather"] = 2 * one_layer + rest
    notes.append(f"fsdp over mesh axes {sorted(gathered)} (x{math.prod(sizes[a] for a in gathered)}): "
                 "one layer's gathered weights (forward and backward) and the gathered embedding/head")
  return out, notes


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
    out.append((f"shard params, grads and Adam state over all {m.dp} data-parallel ways (mesh.fsdp={m.dp})",
                [f"mesh.fsdp={m.dp}"]))
  if m.dp % 2 == 0:
    fs = [f"mesh.fsdp={max(getattr(m, 'fsdp', 1) // 2, 1)}"] if getattr(m, "fsdp", 1) > 1 else []
    out.append((f"trade dp for tp (mesh.dp={m.dp // 2} mesh.tp={m.tp * 2})", [f"mesh.dp={m.dp // 2}", f"mesh.tp={m.tp * 2}", *fs]))
    if mc.n_layers % (2 * m.pp * m.vpp) == 0:
      mb = max(m.microbatches, 2 * m.pp)
      out.append((f"trade dp for pipeline stages (mesh.dp={m.dp // 2} mesh.pp={m.pp * 2} mesh.microbatches={mb})",
                   [f"mesh.dp={m.dp // 2}", f"mesh.pp={m.pp * 2}", f"mesh.microbatches={mb}", *fs]))
  if t.batch_size >= 2:
    out.append((f"halve the global batch (train.batch_size={t.batch_size // 2})", [f"train.batch_size={t.batch_size // 2}"]))
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


def combined_plan(cfg, options: list[Option], device_memory_gib: float | None = None,
                  rounds: int = 4) -> tuple[list[str], Estimate] | None:
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
    f"ep={m.ep} etp={m.etp}" + (f" fsdp={fsdp}" if fsdp is not None else "")
    + (f" microbatches={m.microbatches} {m.schedule}" if m.pp > 1 else ""),
    f"train: batch_size={t.batch_size} seq_len={t.seq_len} grad_accum={t.grad_accum} -> "
    f"{microbatch_rows(c)} sequences per device per forward",
  ]
  lines += [f"  {n}" for n in est.notes]
  a = est.activations
  rows = [("parameters (master)", est.params), ("gradients", est.grads), ("optimizer state (Adam mu, nu)", est.opt_state),
          ("batch", est.batch),
          ("activations, saved for backward", a["saved"] + a.get("banks", 0)),
          ("activations, backward of a layer" + ("" if c.mesh.pp == 1 else " chunk"), a["layer_backward"]),
          ("activations, logits + loss (fp32)", a["head"])]
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
    prog="python -m jaxllm.plan",
    description="Per-device memory of a training run (parameters, gradients, optimizer state, activations), "
                "estimated on abstract shapes: no devices needed.",
    epilog="overrides: section.key=value, e.g. train.batch_size=64 train.seq_len=4096 model.remat=full mesh.tp=4")
  parser.add_argument("--model", help="model preset (same as model=NAME)")
  parser.add_argument("--mesh", help="mesh preset TOML (meshes/*.toml)")
  parser.add_argument("--config", action="append", default=[], help="TOML config file(s)")
  parser.add_argument("--device-memory", type=float, default=None, metavar="GiB",
                      help="memory per device; default from the mesh's chip (TPU v5e 16, v5p 95, v6e 32, H100 80, H200 141)")
  parser.add_argument("--no-suggest", action="store_true", help="skip the re-estimated suggestions")
  parser.add_argument("overrides", nargs="*", help="section.key=value")
  args = parser.parse_args(argv)

  from jaxllm.config import ConfigError, load_config
  overrides = ([f"model={args.model}"] if args.model else []) + ([f"mesh={args.mesh}"] if args.mesh else []) \
    + list(args.overrides)
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


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # shapes only: never claim an accelerator
  sys.exit(main())
