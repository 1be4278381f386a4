"""The shared decoder (Llama/Qwen family), Flax NNX, with layers stacked on a leading L axis and
scanned. Every parameter carries `logical` axis names as metadata; `jaxllm.parallel` turns them into
shardings. The model never sees a mesh.

Shapes: the package legend in jaxllm/__init__.py (B, T, S, D, N, K, H, F, E, V, L).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model import invariant
from jaxllm.model import layers as ops
from jaxllm.model.attention import self_attention
from jaxllm.model.hooks import constrain, sum_partials
from jaxllm.model.moe import moe_mlp


class Output(NamedTuple):
  logits: jax.Array  # [B, T, V] fp32
  aux: dict[str, jax.Array]  # MoE losses averaged over layers ({} for dense)
  cache: Any  # the updated cache, or None


def _param(rngs, shape, names, std, dtype):
  return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * std, logical=names)


def _ones(shape, names, dtype):
  return nnx.Param(jnp.ones(shape, dtype), logical=names)


def _zeros(shape, names, dtype):
  return nnx.Param(jnp.zeros(shape, dtype), logical=names)


class Blocks(nnx.Module):
  """All L decoder blocks; each parameter is stacked [L, ...]. A slice of its state along L is
  one block, which `__call__` runs (see Transformer.hidden)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    L, D, N, K, H, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff
    pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    out_std = std / (2 * L) ** 0.5  # GPT-2: residual projections scaled by depth
    self.attn_norm = _ones((L, D), ("layers", "embed"), pd)
    self.wq = _param(rngs, (L, D, N, H), ("layers", "embed", "heads", "head_dim"), std, pd)
    self.wk = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), std, pd)
    self.wv = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), std, pd)
    self.wo = _param(rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), out_std, pd)
    if cfg.qkv_bias:
      self.bq = _zeros((L, N, H), ("layers", "heads", "head_dim"), pd)
      self.bk = _zeros((L, K, H), ("layers", "kv_heads", "head_dim"), pd)
      self.bv = _zeros((L, K, H), ("layers", "kv_heads", "head_dim"), pd)
    if cfg.qk_norm:
      self.q_norm = _ones((L, H), ("layers", "head_dim"), pd)
      self.k_norm = _ones((L, H), ("layers", "head_dim"), pd)
    self.mlp_norm = _ones((L, D), ("layers", "embed"), pd)
    if cfg.is_moe:
      E, Fm = cfg.n_experts, cfg.resolved_moe_d_ff
      self.router = _param(rngs, (L, D, E), ("layers", "embed", None), std, pd)
      self.w_gate = _param(rngs, (L, E, D, Fm), ("layers", "exp", "embed", "moe_mlp"), std, pd)
      self.w_up = _param(rngs, (L, E, D, Fm), ("layers", "exp", "embed", "moe_mlp"), std, pd)
      self.w_down = _param(rngs, (L, E, Fm, D), ("layers", "exp", "moe_mlp", "embed"), out_std, pd)
      if cfg.shared_expert_d_ff:
        Fs = cfg.shared_expert_d_ff
        self.shared_gate = _param(rngs, (L, D, Fs), ("layers", "embed", "mlp"), std, pd)
        self.shared_up = _param(rngs, (L, D, Fs), ("layers", "embed", "mlp"), std, pd)
        self.shared_down = _param(rngs, (L, Fs, D), ("layers", "mlp", "embed"), out_std, pd)
        if cfg.shared_expert_gate:
          self.shared_expert_gate = _param(rngs, (L, D), ("layers", "embed"), std, pd)
    else:
      self.w_gate = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), std, pd)
      self.w_up = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), std, pd)
      self.w_down = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), out_std, pd)


def block_forward(cfg: ModelConfig, p: dict, x, cos, sin, cache, layer, segment_ids=None):
  """One decoder block. p: this layer's arrays (name -> array without the L axis). Without a cache,
  causal self-attention by `cfg.attention`, within documents when segment_ids [B, T] are given.

  x [B, T, D] -> (x [B, T, D], cache, aux dict).
  """
  dt = x.dtype
  h = ops.rms_norm(x, p["attn_norm"], cfg.norm_eps)
  q, k, v = (ops.project(h, p[name].astype(dt)) for name in ("wq", "wk", "wv"))
  if cfg.qkv_bias:
    q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
  if cfg.qk_norm:
    q, k = ops.rms_norm(q, p["q_norm"], cfg.norm_eps), ops.rms_norm(k, p["k_norm"], cfg.norm_eps)
  q = constrain(ops.apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
  k = constrain(ops.apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
  v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
  if cache is None:
    attn = self_attention(cfg.attention, q, k, v, segment_ids)
  else:
    attn, cache = cache.attend(layer, q, k, v)
  # With the heads split by hand (manual TP) this projection is a partial sum over the local heads.
  x = x + sum_partials(ops.project_out(attn, p["wo"].astype(dt)))
  x = constrain(x, ("batch", "seq", "embed"))
  h = ops.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
  if cfg.is_moe:
    y, aux = moe_mlp(h, p, cfg)
  else:
    y, aux = ops.swiglu(h, p["w_gate"], p["w_up"], p["w_down"]), {}
  x = constrain(x + y, ("batch", "seq", "embed"))
  return x, cache, aux


def invariant_block_forward(cfg: ModelConfig, p: dict, x, positions, cache, layer):
  """block_forward in batch-invariant arithmetic (ModelConfig.batch_invariant; jaxllm.model.invariant):
  the row-wise parts (norms, projections, RoPE, MLP) in fixed row tiles, attention in fixed key
  blocks. Dense models; on a mesh per device (jaxllm.parallel.invariant_tp), with this device's heads.
  x [B, T, D], positions [B, T] -> (x, cache, {})."""
  B, T, D = x.shape
  dt, eps, inv, H = x.dtype, cfg.norm_eps, ops.rope_inv_freq(cfg), cfg.resolved_head_dim

  def qkv(xr, pos):  # [t, D], [t] -> q [t, N, H], k, v [t, K, H]
    h = ops.rms_norm(xr, p["attn_norm"], eps)
    q, k, v = ((h @ p[n].astype(dt).reshape(D, -1)).reshape(h.shape[0], -1, H) for n in ("wq", "wk", "wv"))
    if cfg.qkv_bias:
      q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if cfg.qk_norm:
      q, k = ops.rms_norm(q, p["q_norm"], eps), ops.rms_norm(k, p["k_norm"], eps)
    cos, sin = invariant.rope_tables(pos[None], inv, cfg.max_seq_len)  # [1, t, H]
    return ops.apply_rope(q[None], cos, sin)[0], ops.apply_rope(k[None], cos, sin)[0], v

  q, k, v = invariant.tiled(qkv, x.reshape(B * T, D), positions.reshape(B * T))
  q, k, v = q.reshape(B, T, -1, H), k.reshape(B, T, -1, H), v.reshape(B, T, -1, H)
  if cache is None:
    attn = invariant.sequence_attention(q, k, v)
  else:
    attn, cache = cache.attend(layer, q, k, v)

  def out(xr, a):  # [t, D], [t, N, H] -> [t, D]; under manual TP (jaxllm.parallel.invariant_tp) the
    # heads and MLP columns are this device's, and sum_partials completes each projection in the tile
    xr = xr + sum_partials(a.reshape(a.shape[0], -1) @ p["wo"].astype(dt).reshape(-1, D))
    h = ops.rms_norm(xr, p["mlp_norm"], eps)
    mlp = jax.nn.silu(h @ p["w_gate"].astype(dt)) * (h @ p["w_up"].astype(dt))
    return xr + sum_partials(mlp @ p["w_down"].astype(dt))

  return invariant.tiled(out, x.reshape(B * T, D), attn.reshape(B * T, *attn.shape[2:])).reshape(B, T, D), cache, {}


def remat_policy(policy: str):
  """The jax.checkpoint policy of a ModelConfig.remat name (jaxllm.config.REMAT_POLICIES); None for 'none'."""
  cp = jax.checkpoint_policies
  if policy == "none":
    return None
  if policy == "offload":
    return cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
  return {
    "full": cp.nothing_saveable,
    "dots": cp.dots_with_no_batch_dims_saveable,
    "dots_with_no_batch_dims": cp.dots_with_no_batch_dims_saveable,
    "dots_saveable": cp.dots_saveable,
  }[policy]


def remat(fn, policy: str):
  """fn wrapped in jax.checkpoint per ModelConfig.remat (see jaxllm.config.REMAT_POLICIES)."""
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=remat_policy(policy))


def scan_unroll(cfg: ModelConfig, params: dict, cache=None) -> int:
  """Layers per iteration of the scan over the stacked `params`. model.scan_unroll=0 (auto) unrolls
  every layer on CPU when there is no cache (training, scoring) and no remat: there the loop's
  per-layer slicing, stacking and zero-filled output buffers cost more than the longer compile.
  With remat an unrolled stack compiles to about twice the memory the planner predicts (the scanned
  one meets it). Elsewhere, and for the serving engine's many cached shapes, one layer per step.
  Figures: docs/benchmarks.md."""
  if cfg.scan_unroll:
    return cfg.scan_unroll
  if cache is None and cfg.remat == "none" and jax.default_backend() == "cpu":
    return max(1, next(iter(params.values())).shape[0])
  return 1


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd)
    self.layers = Blocks(cfg, rngs)
    self.final_norm = _ones((cfg.d_model,), ("embed",), pd)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd)

  def layer_params(self) -> dict:
    """name -> stacked [L, ...] array of every block parameter (for scans and pipelines)."""
    return {name: var[...] for name, var in vars(self.layers).items() if isinstance(var, nnx.Param)}

  def embed_tokens(self, tokens):
    # The table as activations see it (model dim whole), so a table split over the model dim is
    # gathered before the lookup rather than the looked-up rows resharded.
    table = constrain(self.embed[...].astype(jnp.dtype(self.cfg.dtype)), ("vocab", "embed"))
    x = table[tokens]
    return constrain(x, ("batch", "seq", "embed"))

  def hidden(self, tokens, positions=None, cache=None, segment_ids=None):
    """tokens [B, T] -> (final hidden [B, T, D] after the last norm, aux, cache). segment_ids [B, T]
    (packed documents, training only): attention stays within each document."""
    cfg = self.cfg
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if cache is None else cache.positions(T)
    x = self.embed_tokens(tokens)
    x, aux, cache = self.run_layers(x, positions, self.layer_params(), cache, segment_ids=segment_ids)
    if cache is not None:
      cache = cache.advance(T)
    if cfg.batch_invariant:
      return invariant.rms_norm(x.reshape(B * T, -1), self.final_norm[...], cfg.norm_eps).reshape(x.shape), aux, cache
    return ops.rms_norm(x, self.final_norm[...], cfg.norm_eps), aux, cache

  def run_layers(self, x, positions, params: dict, cache=None, first_layer: int = 0, segment_ids=None):
    """Scan the blocks whose stacked params are given (all L, or a pipeline chunk)."""
    cfg = self.cfg
    if cfg.batch_invariant and segment_ids is not None:
      raise ValueError(
        "model.batch_invariant does not support document masks (segment_ids) yet; turn off "
        "train.document_masks or model.batch_invariant"
      )
    cos, sin = (None, None) if cfg.batch_invariant else ops.rope_tables(positions, ops.rope_inv_freq(cfg))

    def body(carry, p):
      x, cache, layer = carry
      if cfg.batch_invariant:
        x, cache, aux = invariant_block_forward(cfg, p, x, positions, cache, layer)
      else:
        x, cache, aux = block_forward(cfg, p, x, cos, sin, cache, layer, segment_ids)
      return (x, cache, layer + 1), aux

    (x, cache, _), aux = jax.lax.scan(
      remat(body, cfg.remat), (x, cache, jnp.int32(first_layer)), params, unroll=scan_unroll(cfg, params, cache)
    )
    return x, {k: jnp.mean(v) for k, v in aux.items()}, cache

  def head_weight(self):
    """The output head [D, V] as stored (param dtype): embed.T when tied, else lm_head. The training
    loss reads it (jaxllm.model.loss.chunked_cross_entropy_sums) instead of full logits."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

  def logits(self, h):
    """h [B, T, D] -> logits [B, T, V] in fp32."""
    w = self.head_weight()
    if self.cfg.batch_invariant:
      return invariant.logits(h.reshape(-1, h.shape[-1]), w).reshape(*h.shape[:-1], -1)
    logits = jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))

  def __call__(self, tokens, positions=None, cache=None, segment_ids=None) -> Output:
    h, aux, cache = self.hidden(tokens, positions, cache, segment_ids)
    return Output(self.logits(h), aux, cache)


def aux_loss(cfg: ModelConfig, aux: dict):
  """Weighted sum of the MoE auxiliary losses (0 for dense models)."""
  if not aux:
    return jnp.float32(0.0)
  return cfg.aux_loss_coef * aux["load_balance"] + cfg.z_loss_coef * aux["router_z"]
