"""The device KV page pool and the cache object the shared model attends through.

Shapes: the package legend in jaxllm/__init__.py (L, P, Z, K, H, N, Q, R, M, B, T).

Pool: K and V each `[K, L, P, Z, H]`, head-major (see jaxllm/kernels/reference.py for why); page 0
is the null page. A step packs every scheduled sequence into one ragged sequence of Q tokens (prefill
chunks and decode tokens back to back, vLLM/SGLang style). The model sees it folded into B rows of
T = Q / B tokens (B = 1, or the mesh's dp so the token-parallel parts shard over dp; see engine.py),
so `attend` receives q [B, T, N, H] and k, v [B, T, K, H] and flattens them back to [Q, ...]. It scatters the
new K/V into this layer's pages at
the host-computed `slots` and calls the attention backend. The pool rides the model's layer scan as
part of the carry, so the update is in place, and the step functions donate it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from jaxllm.kernels import get_attention_backend
from jaxllm.model import invariant


@struct.dataclass
class PagedCache:
  k_pages: jax.Array  # [K, L, P, Z, H]
  v_pages: jax.Array  # [K, L, P, Z, H]
  slots: jax.Array  # [Q] int32: page * Z + offset where each new token's K/V goes
  kv_lens: jax.Array  # [R] int32: tokens in each sequence's cache after this step
  page_table: jax.Array  # [R, M] int32, padded with the null page 0
  cu_q_lens: jax.Array  # [R + 1] int32: sequence s owns query rows cu_q_lens[s]:cu_q_lens[s+1]
  num_seqs: jax.Array  # [] int32: real sequences (the rest of R is padding)
  # Split ragged step (optional): sequences [0, num_multi) have q_len > 1 and go through the ragged
  # attention; every later one has a single query at row dec_rows[s] (Q for none) and goes through
  # the decode attention. A decode-heavy mixed step then costs one decode call plus a ragged call over
  # the few prefill chunks, instead of a ragged call over every sequence.
  num_multi: jax.Array | None = None  # [] int32
  dec_rows: jax.Array | None = None  # [R] int32
  backend: object = struct.field(pytree_node=False, default=None)
  decode: bool = struct.field(pytree_node=False, default=False)  # every sequence has q_len 1

  def attend(self, layer, q, k, v):
    K, L, P, Z, H = self.k_pages.shape

    B, T = q.shape[:2]  # B * T = Q
    q, k, v = q.reshape(B * T, *q.shape[2:]), k.reshape(B * T, K, H), v.reshape(B * T, K, H)

    # Index the carried pool in place: viewed as [K, L*P*Z, H] (a free reshape), this layer's slot s
    # is column layer*P*Z + s, so the write is one scatter into the carry (slicing pool[:, layer] out
    # and back costs two copies of the layer per layer and step), and the attention reads the
    # [K, L*P, Z, H] view through page ids offset by layer*P.
    cols = layer * (P * Z) + self.slots
    if cols.shape[0] == 1:
      # A one-row scatter becomes an update XLA:CPU does not do in place inside the layer scan: it
      # copies the whole pool per layer. A second write, into the null page (never read as a key),
      # keeps it a scatter.
      cols = jnp.concatenate([cols, jnp.full_like(cols, layer * (P * Z))])
      k, v = (jnp.concatenate([x, jnp.zeros_like(x)]) for x in (k, v))

    def write(pool, new):  # new [Q, K, H]
      flat = pool.reshape(K, L * P * Z, H).at[:, cols].set(new.astype(pool.dtype).transpose(1, 0, 2))
      return flat.reshape(K, L, P, Z, H)

    k_pages, v_pages = write(self.k_pages, k), write(self.v_pages, v)
    kl, vl = k_pages.reshape(K, L * P, Z, H), v_pages.reshape(K, L * P, Z, H)
    page_table = self.page_table + layer * P
    if self.backend is INVARIANT:
      out = self._invariant_attend(q, kl, vl, page_table)
    elif self.decode:
      out = self.backend.paged_decode_attention(q, kl, vl, self.kv_lens, page_table)
    elif self.dec_rows is None:
      out = self.backend.ragged_paged_attention(q, kl, vl, self.kv_lens, page_table, self.cu_q_lens, self.num_seqs)
    else:
      Q = q.shape[0]
      out = self.backend.ragged_paged_attention(q, kl, vl, self.kv_lens, page_table, self.cu_q_lens, self.num_multi)
      is_dec = self.dec_rows < Q  # [R]
      dec = self.backend.paged_decode_attention(
        q[jnp.minimum(self.dec_rows, Q - 1)], kl, vl, jnp.where(is_dec, self.kv_lens, 0), page_table
      )
      out = out.at[self.dec_rows].set(dec.astype(out.dtype), mode="drop")
    return out.reshape(B, T, *out.shape[1:]).astype(q.dtype), self.replace(k_pages=k_pages, v_pages=v_pages)

  def _invariant_attend(self, q, kl, vl, page_table):
    """Batch-invariant attention (jaxllm.model.invariant.block_attention) of the Q query rows: each
    row's position and page table from its sequence, the pages split into BLOCK-key blocks."""
    K, LP, Z, H = kl.shape
    Q, R = q.shape[0], page_table.shape[0]
    if self.decode:
      seq, pos = jnp.arange(Q), self.kv_lens - 1
    else:
      row = jnp.arange(Q)
      seq = jnp.clip(jnp.searchsorted(self.cu_q_lens, row, side="right") - 1, 0, R - 1)
      pos = self.kv_lens[seq] - (self.cu_q_lens[seq + 1] - row)  # padding rows: < 0, they see nothing
    r = Z // invariant.BLOCK
    blocks = (page_table[:, :, None] * r + jnp.arange(r)).reshape(R, -1)  # [R, M*r] block ids
    kb, vb = kl.reshape(K, LP * r, invariant.BLOCK, H), vl.reshape(K, LP * r, invariant.BLOCK, H)
    return invariant.block_attention(q, pos, blocks[seq], kb, vb)

  def advance(self, T: int):
    return self  # kv_lens already count this step's tokens (the host builds them)


def pool_shape(cfg, num_pages: int, page_size: int) -> tuple:
  """[K, L, P, Z, H] with P = num_pages usable pages plus the null page 0, Z = page_size."""
  return (cfg.n_kv_heads, cfg.n_layers, num_pages + 1, page_size, cfg.resolved_head_dim)


POOL_AXES = ("kv_heads", "layers", None, None, "head_dim")  # logical axes of pool_shape's dims


INVARIANT = "invariant"  # PagedCache.backend of batch-invariant steps (ModelConfig.batch_invariant)


class Backend:
  """The two attention functions; hashed by identity so it can sit in the cache's static fields."""

  def __init__(self, name, ragged, decode):
    self.name, self.ragged_paged_attention, self.paged_decode_attention = name, ragged, decode


def attention_backend(name: str, mesh=None, plan=None, cfg=None) -> Backend:
  """The engine's view of `jaxllm.kernels.get_attention_backend(name)`.

  On a mesh the Pallas kernels run inside `shard_map`, each device on its local kv heads (and the
  query heads of their GQA groups) of the pool shard it holds: a kernel is an opaque custom call
  that GSPMD cannot partition, and left to it would replicate (all-gather) the pool around the
  call. Heads are split only when the plan shards kv heads and query heads over the same axes (when
  kv heads are fewer than tp they stay replicated, and so does the attention). The XLA path needs no
  wrapper: GSPMD partitions its gathers and einsums over the sharded head dims itself."""
  b = get_attention_backend(name)
  if mesh is None or b.name == "reference":
    return Backend(b.name, b.ragged_paged_attention, b.paged_decode_attention)
  from jaxllm.parallel.sharding import logical_spec

  heads = logical_spec(plan, ("kv_heads",), (cfg.n_kv_heads,))[0]
  if heads != logical_spec(plan, ("heads",), (cfg.n_heads,))[0]:
    heads = None
  q, pool, rep = PartitionSpec(None, heads, None), PartitionSpec(heads, None, None, None), PartitionSpec()
  wrap = lambda fn, n_meta: jax.shard_map(
    fn, mesh=mesh, in_specs=(q, pool, pool) + (rep,) * n_meta, out_specs=q, check_vma=False
  )  # Pallas needs check_vma off
  return Backend(b.name, wrap(b.ragged_paged_attention, 4), wrap(b.paged_decode_attention, 2))
