"""Activation bytes of one training micro-step: the vjp residuals of the real decoder block traced on
one device's shapes under the configured remat policy, plus the head, MoE dispatch, pipeline stash
and FSDP gathers (see jaxllm/planner/__init__.py for what is modelled)."""

from __future__ import annotations

import dataclasses
import functools
import math

from jaxllm.planner.shapes import axis_sizes, compute_shapes, fsdp_axes, nbytes

# Gradient temporaries of one layer's backward, as a fraction of its full residual set (calibrated
# against XLA's buffer assignment of the compiled train step, tests/planner/test_planner.py).
GRAD_TEMP = 0.75
# fp32 score tiles alive at once in the backward of blockwise (flash) attention (same calibration).
FLASH_BWD_TILES = 3


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
    y = _dispatch(
      xc,
      ids.reshape(B * T, -1)[:n_own],
      weights.reshape(B * T, -1)[:n_own],
      w_gate,
      w_up,
      w_down,
      ep=(),
      etp=(),
      n_ep=n_ep,
      capacity_factor=0.0,
    )
    return jnp.tile(y, (n_tp, 1)).reshape(B, T, D).astype(x.dtype)  # the all_gather over tp

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
  w = jax.ShapeDtypeStruct(w.shape[::-1] if cfg.tie_embeddings else w.shape, w.dtype)  # [D, V/tp]
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
    notes.append(
      f"attention {cfg.model.attention}"
      + (f" (traced as {mc.attention})" if mc.attention != cfg.model.attention else "")
      + (f", loss in chunks of {mc.loss_chunk} positions" if chunked else ", loss over whole sequences")
    )
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
    pipe_remat = cfg.model.remat == "full"  # the Pipeline's chunk-level remat (jaxllm.train.loop.build_steps)
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
    notes.append(
      f"pipeline {mesh.schedule} pp={mesh.pp} vpp={mesh.vpp} m={mesh.microbatches}: {kept} "
      f"{'stashed ' if mesh.schedule == '1f1b' else ''}chunk "
      f"{'inputs' if pipe_remat else 'residual sets'} of {C} layers per stage"
    )
  if getattr(mc, "attention", None) == "flash":
    # The blockwise backward recomputes each (query block, key block) tile: scores, probabilities and
    # their gradients, fp32 [b, N/tp, block_q, block_k] each, next to the layer's other gradients.
    from jaxllm.model import attention as A

    heads = weights["layers"]["wq"].shape[2]
    tile = nbytes((b, heads, A.flash_block(T, None, A.BLOCK_Q), A.flash_block(T, None, A.BLOCK_K)), "float32")
    out["layer_backward"] += FLASH_BWD_TILES * tile
  gathered = fsdp_axes(mdef, plan)
  if gathered:
    sizes = axis_sizes(plan)
    one_layer = sum(nbytes(a.shape[1:], a.dtype) for a in jax.tree.leaves(weights["layers"]))
    rest = sum(nbytes(a.shape, a.dtype) for k, v in weights.items() if k != "layers" for a in jax.tree.leaves(v))
    out["fsdp_gather"] = 2 * one_layer + rest
    notes.append(
      f"fsdp over mesh axes {sorted(gathered)} (x{math.prod(sizes[a] for a in gathered)}): "
      "one layer's gathered weights (forward and backward) and the gathered embedding/head"
    )
  return out, notes
