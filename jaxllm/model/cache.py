"""Attention caches. The model calls `cache.attend(layer, q, k, v)` in every layer and
`cache.advance(T)` after the last; any pytree with these two methods plugs in (the serving engine's
paged cache does). This one is the simple contiguous cache for incremental decode.

Shapes: the package legend in jaxllm/__init__.py (L, B, S = cache capacity, T, N, K, H).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxllm.model.layers import attention


@struct.dataclass
class KVCache:
  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  lengths: jax.Array  # [B] int32, tokens already cached per row (= position of the next token)

  @classmethod
  def init(cls, cfg, batch: int, capacity: int, dtype=None):
    dtype = dtype or jnp.dtype(cfg.dtype)
    shape = (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.resolved_head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  def positions(self, T: int):
    """[B, T] positions of T new tokens appended to every row."""
    return self.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]

  def attend(self, layer, q, k, v):
    """Write k, v [B, T, K, H] at each row's length, attend q [B, T, N, H] to the cached prefix."""
    T = q.shape[1]
    write = jax.vmap(lambda c, new, start: jax.lax.dynamic_update_slice_in_dim(c, new, start, axis=0))
    k_l = write(self.k[layer], k.astype(self.k.dtype), self.lengths)  # [B, S, K, H]
    v_l = write(self.v[layer], v.astype(self.v.dtype), self.lengths)
    q_pos = self.positions(T)  # [B, T]
    mask = jnp.arange(self.capacity)[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    out = attention(q, k_l.astype(q.dtype), v_l.astype(q.dtype), mask)
    new = self.replace(
      k=jax.lax.dynamic_update_index_in_dim(self.k, k_l, layer, 0),
      v=jax.lax.dynamic_update_index_in_dim(self.v, v_l, layer, 0),
    )
    return out, new

  def advance(self, T: int):
    return self.replace(lengths=self.lengths + T)
