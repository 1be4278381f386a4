"""The device KV page pool and the cache object the shared model attends through.

Pool: K and V each `[L, P, ps, K, H]` (layers, pages, page size, kv heads, head dim); page 0 is the
null page. A step packs every scheduled sequence into one ragged sequence of Tt tokens (prefill
chunks and decode tokens back to back, vLLM/SGLang style). The model sees it folded into R rows
(R = 1, or the mesh's dp so the token-parallel parts shard over dp; see engine.py), so `attend`
receives q [R, Tt/R, N, H] and k, v [R, Tt/R, K, H] and flattens them back. It scatters the new K/V into this layer's pages at the
host-computed `slots` and calls the attention backend. The pool rides the model's layer scan as part
of the carry, so the update is in place, and the step functions donate it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxllm.kernels import get_attention_backend


@struct.dataclass
class PagedCache:
  k_pages: jax.Array      # [L, P, ps, K, H]
  v_pages: jax.Array      # [L, P, ps, K, H]
  slots: jax.Array        # [Tt] int32: page * ps + offset where each new token's K/V goes
  kv_lens: jax.Array      # [S] int32: tokens in each sequence's cache after this step
  page_table: jax.Array   # [S, maxp] int32, padded with the null page 0
  cu_q_lens: jax.Array    # [S + 1] int32: sequence s owns query rows cu_q_lens[s]:cu_q_lens[s+1]
  num_seqs: jax.Array     # [] int32: real sequences (the rest of S is padding)
  # Split ragged step (optional): sequences [0, num_multi) have q_len > 1 and go through the ragged
  # attention; every later one has a single query at row dec_rows[s] (Tt for none) and goes through
  # the decode attention. A decode-heavy mixed step then costs one decode call plus a ragged call over
  # the few prefill chunks, instead of a ragged call over every sequence.
  num_multi: jax.Array | None = None     # [] int32
  dec_rows: jax.Array | None = None      # [S] int32
  backend: object = struct.field(pytree_node=False, default=None)
  decode: bool = struct.field(pytree_node=False, default=False)  # every sequence has q_len 1

  def attend(self, layer, q, k, v):
    L, P, ps, K, H = self.k_pages.shape

    R, T = q.shape[:2]
    q, k, v = q.reshape(R * T, *q.shape[2:]), k.reshape(R * T, K, H), v.reshape(R * T, K, H)

    # Index the carried pool in place: viewed as [L*P*ps, K, H] (a free reshape of the leading
    # dims), this layer's slot s is row layer*P*ps + s, so the write is one scatter into the carry
    # (slicing pool[layer] out and back costs two copies of the layer per layer and step), and the
    # attention reads the [L*P, ps, K, H] view through page ids offset by layer*P.
    rows = layer * (P * ps) + self.slots
    def write(pool, new):
      flat = pool.reshape(L * P * ps, K, H).at[rows].set(new.astype(pool.dtype))
      return flat.reshape(L, P, ps, K, H)

    k_pages, v_pages = write(self.k_pages, k), write(self.v_pages, v)
    kl, vl = k_pages.reshape(L * P, ps, K, H), v_pages.reshape(L * P, ps, K, H)
    page_table = self.page_table + layer * P
    if self.decode:
      out = self.backend.paged_decode_attention(q, kl, vl, self.kv_lens, page_table)
    elif self.dec_rows is None:
      out = self.backend.ragged_paged_attention(q, kl, vl, self.kv_lens, page_table,
                                                self.cu_q_lens, self.num_seqs)
    else:
      Tt = q.shape[0]
      out = self.backend.ragged_paged_attention(q, kl, vl, self.kv_lens, page_table,
                                                self.cu_q_lens, self.num_multi)
      is_dec = self.dec_rows < Tt                                      # [S]
      dec = self.backend.paged_decode_attention(q[jnp.minimum(self.dec_rows, Tt - 1)], kl, vl,
                                                jnp.where(is_dec, self.kv_lens, 0), page_table)
      out = out.at[self.dec_rows].set(dec.astype(out.dtype), mode="drop")
    return out.reshape(R, T, *out.shape[1:]).astype(q.dtype), self.replace(k_pages=k_pages, v_pages=v_pages)

  def advance(self, T: int):
    return self   # kv_lens already count this step's tokens (the host builds them)


def pool_shape(cfg, num_pages: int, page_size: int) -> tuple:
  """num_pages usable pages plus the null page 0."""
  return (cfg.n_layers, num_pages + 1, page_size, cfg.n_kv_heads, cfg.head_dim_)


class Backend:
  """The two attention functions; hashed by identity so it can sit in the cache's static fields."""

  def __init__(self, name, ragged, decode):
    self.name, self.ragged_paged_attention, self.paged_decode_attention = name, ragged, decode


def attention_backend(name: str) -> Backend:
  """The engine's view of `jaxllm.kernels.get_attention_backend(name)` ("reference" or "pallas")."""
  b = get_attention_backend(name)
  return Backend(name, b.ragged_paged_attention, b.paged_decode_attention)
