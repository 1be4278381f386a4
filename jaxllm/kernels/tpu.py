"""Pallas TPU paged attention: page tables are scalar-prefetched into SMEM and drive the BlockSpec
index maps, so the pipeline DMAs exactly the pages a sequence owns (the design of JAX's TPU
paged_attention and of vLLM/SGLang's ragged paged attention on TPU).

Same interface and semantics as jaxllm/kernels/reference.py. Pass `interpret=pltpu.InterpretParams()`
(what get_attention_backend("pallas") does on CPU) to run under TPU interpret mode.
Shapes: the package legend in jaxllm/__init__.py (R, Q, N, K, G, H, Z, M); bq is the ragged query
block (tokens), and `rows` the query rows one kv head has in a grid step: G (decode) or bq * G (ragged).

Layout choices (why):
- q is regrouped by kv head, [.., K, rows * G, H], so each kv head's queries are one 2D matrix: every
  matmul in the kernel is a plain 2D dot, and a GQA group shares one load of its K/V page.
- One page per grid step, the whole [Z, K, H] page (its last two dims are the full array dims, which
  satisfies the TPU (8, 128) block rule for any K and H). Steps past a sequence's last needed page
  repeat that page's block index, so the pipeline issues no DMA for them, and their compute is skipped.
- Online softmax (Milakov & Gimelshein 2018; FlashAttention) across the page axis, the innermost
  "arbitrary" grid dim, with fp32 m / l / acc in VMEM scratch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxllm.kernels.reference import MASK_VALUE


def _online_softmax_step(q, k, v, valid, kv_valid, m_ref, l_ref, acc_ref, kh, scale):
  """One kv head, one page. q [rows, H]; k, v [Z, H]; valid [rows, Z]; kv_valid [Z, 1].

  m_ref, l_ref [K, rows, 1] and acc_ref [K, rows, H] are fp32 running max / denominator / numerator.
  Masked keys get probability exactly 0 (so a row with nothing valid yet keeps l = 0), and values past
  the sequence's length are zeroed, since their slots may hold anything (0 * NaN = NaN).
  """
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  s = jnp.where(valid, s, MASK_VALUE)                                   # [rows, Z]
  m_prev = m_ref[kh]                                                    # [rows, 1]
  m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
  p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
  alpha = jnp.exp(m_prev - m_new)
  v = jnp.where(kv_valid, v, jnp.zeros((), v.dtype))
  pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [rows, H]
  m_ref[kh] = m_new
  l_ref[kh] = alpha * l_ref[kh] + p.sum(axis=-1, keepdims=True)
  acc_ref[kh] = alpha * acc_ref[kh] + pv


def _init(m_ref, l_ref, acc_ref):
  m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def _finish(o_ref, l_ref, acc_ref):
  l = l_ref[...]
  o_ref[...] = (acc_ref[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)  # no valid key -> 0


# ---------------------------------------------------------------------------------------------------
# Decode: grid (R, M); one query row per sequence.


def _decode_kernel(kv_lens_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, Z, K):
  # q_ref, o_ref [K, G, H]; k_ref, v_ref [Z, K, H] (the page this step's index map picked).
  s, p = pl.program_id(0), pl.program_id(1)
  kv_len = kv_lens_ref[s]

  @pl.when(p == 0)
  def _():
    _init(m_ref, l_ref, acc_ref)

  @pl.when(p * Z < kv_len)
  def _():
    G, H = q_ref.shape[1], q_ref.shape[2]
    kv_valid = p * Z + jax.lax.broadcasted_iota(jnp.int32, (Z, 1), 0) < kv_len   # [Z, 1]
    valid = jnp.broadcast_to(kv_valid.reshape(1, Z), (G, Z))
    for kh in range(K):  # static: K is small, and each head is a 2D matmul
      _online_softmax_step(q_ref[kh], k_ref[:, kh, :], v_ref[:, kh, :], valid, kv_valid,
                           m_ref, l_ref, acc_ref, kh, H ** -0.5)

  @pl.when(p == pl.num_programs(1) - 1)
  def _():
    _finish(o_ref, l_ref, acc_ref)


def _page_index(pt_ref, row, M, p, last):
  """Page id for grid step p of page-table row `row` (pt_ref is the [R, M] table flattened), clamped
  to the last page it needs."""
  return pt_ref[row * M + jnp.maximum(jnp.minimum(p, last), 0)]


@functools.partial(jax.jit, static_argnames=("interpret",))
def paged_decode_attention(q, k_pages, v_pages, kv_lens, page_table, *, interpret=False):
  """q [R, N, H] -> [R, N, H]; semantics in jaxllm/kernels/reference.py."""
  R, N, H = q.shape
  _, Z, K, _ = k_pages.shape
  M = page_table.shape[1]
  G = N // K
  qg = q.reshape(R, K, G, H)

  def kv_map(s, p, kv_lens, pt):
    return (_page_index(pt, s, M, p, pl.cdiv(kv_lens[s], Z) - 1), 0, 0, 0)

  q_spec = pl.BlockSpec((pl.squeezed, K, G, H), lambda s, p, kv_lens, pt: (s, 0, 0, 0))
  kv_spec = pl.BlockSpec((pl.squeezed, Z, K, H), kv_map)
  out = pl.pallas_call(
      functools.partial(_decode_kernel, Z=Z, K=K),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(R, M), in_specs=[q_spec, kv_spec, kv_spec], out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((K, G, 1), jnp.float32), pltpu.VMEM((K, G, 1), jnp.float32),
                          pltpu.VMEM((K, G, H), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
  )(kv_lens.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1), qg, k_pages, v_pages)
  return out.reshape(R, N, H)


# ---------------------------------------------------------------------------------------------------
# Ragged (mixed prefill + decode): grid (query blocks of bq tokens, window slots, M). A query block
# holds rows of at most bq sequences (every live sequence with rows owns at least one), so instead of
# visiting all R sequences per block, the middle axis walks a window of min(R, bq) slots: slot j is the
# j-th sequence with rows from the one owning the block's first row on. Sequence ids come from `order`
# (live sequences with rows first, in row order) and the window start from `first` [blocks], both
# scalar-prefetched.


def _seq(j, i, order_ref, first_ref, n_ref, R):
  """(sequence id, whether this window slot holds a live sequence) for grid point (i, j)."""
  w = first_ref[i] + j
  return order_ref[jnp.minimum(w, R - 1)], w < n_ref[0]


def _ragged_kernel(kv_lens_ref, pt_ref, cu_ref, order_ref, first_ref, n_ref, q_ref, k_ref, v_ref,
                   o_ref, m_ref, l_ref, acc_ref, *, Z, K, G, bq, R):
  # q_ref, o_ref [K, bq * G, H] (row r = token r // G of this block, head r % G of the group).
  i, j, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  s, in_window = _seq(j, i, order_ref, first_ref, n_ref, R)
  start, end, kv_len = cu_ref[s], cu_ref[s + 1], kv_lens_ref[s]
  blk_lo = i * bq
  blk_hi = jnp.minimum(end, blk_lo + bq) - 1                  # last of this seq's rows in the block
  max_qpos = kv_len - (end - start) + (blk_hi - start)        # furthest key any of them may see

  @pl.when((j == 0) & (p == 0))
  def _():
    _init(m_ref, l_ref, acc_ref)

  @pl.when(in_window & (start < blk_lo + bq) & (p * Z <= max_qpos))
  def _():
    H = q_ref.shape[2]
    tok = blk_lo + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (bq * G, 1), 0), G)   # [bq * G, 1]
    qpos = kv_len - (end - start) + (tok - start)
    kpos = p * Z + jax.lax.broadcasted_iota(jnp.int32, (1, Z), 1)                # [1, Z]
    valid = (tok >= start) & (tok < end) & (kpos <= qpos) & (kpos < kv_len)       # [bq * G, Z]
    kv_valid = (p * Z + jax.lax.broadcasted_iota(jnp.int32, (Z, 1), 0)) < kv_len   # [Z, 1]
    for kh in range(K):
      _online_softmax_step(q_ref[kh], k_ref[:, kh, :], v_ref[:, kh, :], valid, kv_valid,
                           m_ref, l_ref, acc_ref, kh, H ** -0.5)

  @pl.when((j == pl.num_programs(1) - 1) & (p == pl.num_programs(2) - 1))
  def _():
    _finish(o_ref, l_ref, acc_ref)


@functools.partial(jax.jit, static_argnames=("interpret", "block_q"))
def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                           interpret=False, block_q=8):
  """q [Q, N, H] -> [Q, N, H]; semantics in jaxllm/kernels/reference.py."""
  Q, N, H = q.shape
  _, Z, K, _ = k_pages.shape
  R, M = page_table.shape
  G, bq = N // K, block_q
  nb = pl.cdiv(Q, bq)
  Qp = nb * bq                                                # padded rows belong to no sequence
  qg = jnp.pad(q, ((0, Qp - Q), (0, 0), (0, 0))).reshape(Qp, K, G, H)
  qg = qg.transpose(1, 0, 2, 3).reshape(K, Qp * G, H)         # [K, (token, g), H]

  cu = cu_q_lens.astype(jnp.int32)
  has_rows = (cu[1:] > cu[:-1]) & (jnp.arange(R) < num_seqs)  # [R]
  order = jnp.argsort(~has_rows, stable=True).astype(jnp.int32)
  ends = jnp.where(has_rows[order], cu[1:][order], jnp.iinfo(jnp.int32).max)  # increasing
  first = jnp.searchsorted(ends, jnp.arange(nb, dtype=jnp.int32) * bq, side="right").astype(jnp.int32)
  n_live = jnp.sum(has_rows, dtype=jnp.int32).reshape(1)

  def kv_map(i, j, p, kv_lens, pt, cu, order, first, n):
    s, _ = _seq(j, i, order, first, n, R)
    start, end = cu[s], cu[s + 1]
    blk_hi = jnp.minimum(end, i * bq + bq) - 1
    last = jax.lax.div(kv_lens[s] - (end - start) + (blk_hi - start), Z)  # last page needed (<0: none)
    return (_page_index(pt, s, M, p, last), 0, 0, 0)

  q_spec = pl.BlockSpec((K, bq * G, H), lambda i, j, p, *_: (0, i, 0))
  kv_spec = pl.BlockSpec((pl.squeezed, Z, K, H), kv_map)
  out = pl.pallas_call(
      functools.partial(_ragged_kernel, Z=Z, K=K, G=G, bq=bq, R=R),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=6, grid=(nb, min(R, bq), M), in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((K, bq * G, 1), jnp.float32), pltpu.VMEM((K, bq * G, 1), jnp.float32),
                          pltpu.VMEM((K, bq * G, H), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(kv_lens.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1), cu, order, first, n_live,
    qg, k_pages, v_pages)
  out = out.reshape(K, Qp, G, H).transpose(1, 0, 2, 3).reshape(Qp, N, H)
  return out[:Q]
