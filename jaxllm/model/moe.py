"""Mixture-of-experts block: softmax router, top-k, dropless grouped-matmul experts, aux losses.

Shapes: the package legend in jaxllm/__init__.py (B, T, D, E, k, F).
The expert computation is a hook (`hooks.moe_experts_impl`): by default the local dropless
dispatch below; under expert parallelism `jaxllm.parallel.moe` installs a sharded version
with the same signature and the same result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model import hooks
from jaxllm.model.layers import swiglu


def route(x, w_router, k: int, renormalize: bool):
  """x [B, T, D], w_router [D, E] -> (expert ids [B, T, k], weights [B, T, k] fp32, aux dict).

  aux: 'load_balance' = E * sum_e f_e * P_e (Switch Transformer, eq. 4; f_e the fraction of routed
  slots that chose e, P_e the mean router prob) and 'router_z' = mean logsumexp(logits)^2 (ST-MoE).
  """
  logits = jnp.einsum("btd,de->bte", x, w_router.astype(x.dtype), preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  weights, ids = jax.lax.top_k(probs, k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  E = w_router.shape[-1]
  # Batch statistics go through `hooks.batch_mean`, so a data-parallel shard that sees only its own
  # tokens still gets whole-batch f_e and P_e (each averaged before their product).
  chosen = jax.nn.one_hot(ids, E, dtype=jnp.float32).sum(axis=-2)  # [B, T, E]
  frac = hooks.batch_mean(jnp.mean(chosen, axis=(0, 1)) / k)  # [E]
  mean_prob = hooks.batch_mean(jnp.mean(probs, axis=(0, 1)))  # [E]
  aux = {
    "load_balance": E * jnp.sum(frac * mean_prob),
    "router_z": hooks.batch_mean(jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))),
  }
  return ids, weights, aux


def local_experts(x, ids, weights, w_gate, w_up, w_down):
  """Dropless expert FFN on one device: sort token slots by expert, grouped matmuls, unsort.

  x [B, T, D]; ids, weights [B, T, k]; w_gate, w_up [E, D, F]; w_down [E, F, D] -> [B, T, D].
  """
  B, T, D = x.shape
  k = ids.shape[-1]
  E = w_gate.shape[0]
  xt = x.reshape(B * T, D)
  flat_ids = ids.reshape(-1)  # [B*T*k]
  order = jnp.argsort(flat_ids, stable=True)
  token_of_slot = order // k
  group_sizes = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
  y = expert_ffn(xt[token_of_slot], group_sizes, w_gate, w_up, w_down)  # [B*T*k, D]
  y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
  out = jnp.zeros_like(xt).at[token_of_slot].add(y)
  return out.reshape(B, T, D)


def expert_ffn(xs, group_sizes, w_gate, w_up, w_down):
  """SwiGLU over rows grouped by expert. xs [M, D] sorted by expert; group_sizes [E] -> [M, D]."""
  dt = xs.dtype
  h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate.astype(dt), group_sizes)) * jax.lax.ragged_dot(
    xs, w_up.astype(dt), group_sizes
  )
  return jax.lax.ragged_dot(h, w_down.astype(dt), group_sizes)


def moe_mlp(x, p, cfg):
  """The MoE MLP of one layer. x [B, T, D]; p holds this layer's arrays. -> (y [B, T, D], aux)."""
  ids, weights, aux = route(x, p["router"], cfg.n_experts_per_tok, cfg.moe_renormalize)
  experts = hooks.moe_experts_impl() or local_experts
  y = experts(x, ids, weights, p["w_gate"], p["w_up"], p["w_down"])
  if cfg.shared_expert_d_ff:
    shared = swiglu(x, p["shared_gate"], p["shared_up"], p["shared_down"])  # already summed over split F
    if cfg.shared_expert_gate:  # gate from the full x, applied after the sum
      shared = jax.nn.sigmoid(x @ p["shared_expert_gate"].astype(x.dtype)[:, None]) * shared
    y = y + shared
  return y, aux
