"""Manual tensor parallelism: the decoder blocks, final norm, head and loss inside one `shard_map`
that is manual over every mesh axis (so MoE layers can use the all-to-all dispatch of
jaxllm.parallel.moe directly, with no nested shard_map).

Inside such a region every array is a local shard and the code is written per device, as in
Megatron-LM (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models
Using Model Parallelism"). Parameters enter with the specs of the rules table (sharding.param_specs):
attention heads, kv heads, the MLP hidden dim and the vocab are split over tp, experts over ep/etp,
the rest replicated. Tokens enter split over dp and replicated over tp. Then per block:

  - q/k/v and gate/up projections of the replicated activations give local heads / hidden columns
    (Megatron's column-parallel linear, "f": identity forward, all-reduce of the input grad backward);
  - the output and down projections give partial sums over the split dim, which the model hands to
    `hooks.sum_partials` = psum over tp (row-parallel linear, "g": all-reduce forward, identity backward);
  - MoE experts run the per-device all-to-all dispatch (`device_experts`), router statistics go
    through `hooks.batch_mean` = pmean over dp.

With `check_vma=True` shard_map tracks which axes each value varies over and inserts the backward
collectives of "f" itself (the transpose of an implicit pcast to varying is a psum), so
`jax.grad` taken outside the shard_map gives the full gradient of every replicated parameter.
kv heads that tp does not divide stay replicated (as Megatron replicates them when tp > K) and
`localize_layer_params` keeps the one this rank's query heads use. The head is vocab-parallel with
Megatron's cross-entropy (`vocab_parallel_nll`): no device ever holds a [B, T, V] logits tensor.

Shapes: the package legend in jaxllm/__init__.py (B, T, D, N, K, H, V).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.model import hooks
from jaxllm.model.loss import token_nll
from jaxllm.parallel.mesh import MeshPlan, live_axes
from jaxllm.parallel.moe import device_experts
from jaxllm.parallel.sharding import param_specs


def check_manual(cfg: ModelConfig, plan: MeshPlan) -> None:
  """ConfigError unless manual TP/EP can split this model on this mesh."""
  tp, ep, etp = plan.size("tp"), plan.size("ep"), plan.size("etp")
  bad = []
  if cfg.n_heads % tp:
    bad.append(f"model.n_heads={cfg.n_heads} must be divisible by mesh.tp={tp}")
  if cfg.n_kv_heads % tp and tp % cfg.n_kv_heads:
    bad.append(f"model.n_kv_heads={cfg.n_kv_heads} must divide or be divisible by mesh.tp={tp}")
  if not cfg.is_moe and cfg.d_ff % tp:
    bad.append(f"model.d_ff={cfg.d_ff} must be divisible by mesh.tp={tp}")
  if cfg.is_moe and cfg.shared_expert_d_ff % tp:
    bad.append(f"model.shared_expert_d_ff={cfg.shared_expert_d_ff} must be divisible by mesh.tp={tp}")
  if cfg.is_moe and cfg.n_experts % ep:
    bad.append(f"model.n_experts={cfg.n_experts} must be divisible by mesh.ep={ep}")
  if cfg.is_moe and cfg.resolved_moe_d_ff % etp:
    bad.append(f"the expert hidden size (model.moe_d_ff={cfg.resolved_moe_d_ff}) must be divisible by mesh.etp={etp}")
  if bad:
    raise ConfigError(
      "manual tensor parallelism cannot split this model: "
      + "; ".join(bad)
      + ". Change the model sizes or pick a smaller mesh.tp / mesh.ep / mesh.etp."
    )


def _identity(x):
  return x


def manual_hooks(plan: MeshPlan, cfg: ModelConfig, capacity_factor: float = 0.0) -> dict:
  """Keyword arguments for `hooks.using(...)` inside a region manual over every mesh axis. Every
  hook is set explicitly, so hooks installed outside (e.g. global sharding constraints) are off.
  Raises ConfigError (`check_manual`) when the model cannot be split this way."""
  check_manual(cfg, plan)
  tp, dp = live_axes(plan, "tp"), live_axes(plan, "dp")
  return {
    "constrain": lambda x, names: x,
    "moe_experts": device_experts(plan, capacity_factor),
    "sum_partials": (lambda x: jax.lax.psum(x, tp)) if tp else _identity,
    "batch_mean": (lambda x: jax.lax.pmean(x, dp)) if dp else _identity,
  }


@contextlib.contextmanager
def manual(plan: MeshPlan, cfg: ModelConfig, capacity_factor: float = 0.0):
  """`with manual(plan, cfg): ...` runs model code per device: all hooks cleared, then the manual ones."""
  with hooks.cleared(), hooks.using(**manual_hooks(plan, cfg, capacity_factor)):
    yield


def localize_layer_params(p: dict, plan: MeshPlan, cfg: ModelConfig) -> dict:
  """Per-device fix-up of one layer's (or a [L, ...] stack's) params inside the region. With
  tp > K the kv heads are replicated; keep the one this tp rank's query heads attend with (ranks
  r*tp/K .. (r+1)*tp/K - 1 share kv head r). With K % tp == 0 both are split contiguously and the
  local query heads already match the local kv heads. Gradients flow back through the slice."""
  tp = live_axes(plan, "tp")
  n_tp, K = plan.size("tp"), cfg.n_kv_heads
  if not tp or K % n_tp == 0:
    return p
  kv = jax.lax.axis_index(tp) // (n_tp // K)
  out = dict(p)
  for name in ("wk", "wv", "bk", "bv"):  # [..., K, H]
    if name in p:
      out[name] = jax.lax.dynamic_slice_in_dim(p[name], kv, 1, axis=p[name].ndim - 2)
  return out


def fsdp_gathers(mdef, plan: MeshPlan) -> dict:
  """Tree like the params: (dim, axes) of the model dim a parameter splits over the FSDP axes
  (sharding.PARAM_RULES), or None where nothing is split."""

  def one(names, spec):
    if "embed" not in names:
      return None
    axes = spec[names.index("embed")]
    return None if axes is None else (names.index("embed"), axes)

  return jax.tree.map(one, mdef.logical, param_specs(mdef, plan), is_leaf=lambda x: isinstance(x, tuple))


def gather_fsdp(params: dict, gathers: dict, skip: int = 0) -> dict:
  """ZeRO-3's gather (Rajbhandari et al. 2020): each FSDP-split parameter of `params` all-gathered
  whole over its FSDP axes, where it is used (per layer inside a chunk's scan: `skip=1` for a layer's
  params without the stacked L dim). Its transpose, a reduce-scatter, hands each device the summed
  gradient of its own shard."""

  def one(x, g):
    return x if g is None else jax.lax.all_gather(x, g[1], axis=g[0] - skip, tiled=True)

  return {k: one(v, gathers[k]) for k, v in params.items()}


def _vocab_range(plan: MeshPlan, local_v: int, vocab_size: int):
  """(tp axes, first vocab id of this rank) when the vocab dim is split over tp, else None."""
  tp = live_axes(plan, "tp")
  if local_v == vocab_size:
    return None
  if local_v * plan.size("tp") != vocab_size:
    raise ValueError(f"local vocab {local_v} is neither the full vocab {vocab_size} nor 1/tp of it")
  return tp, jax.lax.axis_index(tp) * local_v


def vocab_parallel_embed(tokens, embed, plan: MeshPlan, vocab_size: int, dtype=None):
  """Megatron's vocab-parallel embedding. tokens [B/dp, T] int (this dp rank's rows); embed the
  local [V/tp, D] (or full [V, D]) table -> [B/dp, T, D] in `dtype`: each rank looks up the tokens
  in its vocab range, zeros elsewhere, and a psum over tp completes the rows."""
  table = embed.astype(dtype or embed.dtype)
  split = _vocab_range(plan, embed.shape[0], vocab_size)
  if split is None:
    return table[tokens]
  tp, start = split
  local = tokens - start
  inside = (local >= 0) & (local < embed.shape[0])
  x = jnp.where(inside[..., None], table[jnp.clip(local, 0, embed.shape[0] - 1)], 0)
  return jax.lax.psum(x, tp)


def vocab_parallel_nll(h, w_head, targets, plan: MeshPlan, vocab_size: int):
  """Megatron's vocab-parallel cross-entropy. h [B/dp, T, D] (replicated over tp); w_head the local
  [D, V/tp] head (tied embeddings: embed.T, same split) or the full [D, V]; targets [B/dp, T] int
  -> nll [B/dp, T] fp32, replicated over tp.

  Local logits in fp32; the global max (pmax, outside the gradient: it cancels), the psum of the
  exp-sums, and the target logit from the rank whose vocab range holds it (psum) give
  logsumexp - target logit. An unsplit head is the plain `token_nll`."""
  logits = jnp.einsum("btd,dv->btv", h, w_head.astype(h.dtype), preferred_element_type=jnp.float32)
  split = _vocab_range(plan, w_head.shape[-1], vocab_size)
  if split is None:
    return token_nll(logits, targets)
  tp, start = split
  m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), tp)  # [B/dp, T]
  logz = jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), tp)) + m
  local = targets - start
  inside = (local >= 0) & (local < logits.shape[-1])
  picked = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
  return logz - jax.lax.psum(jnp.where(inside, picked, 0.0), tp)
