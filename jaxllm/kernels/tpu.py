"""Pallas TPU paged attention on the head-major pool [K, P, Z, H]: the kernel DMAs the pages itself,
several per step, double-buffered (the design of JAX's TPU paged_attention,
jax/experimental/pallas/ops/tpu/paged_attention, and of vLLM/SGLang's ragged paged attention on TPU).

Same interface and semantics as jaxllm/kernels/reference.py. Pass `interpret=pltpu.InterpretParams()`
(what get_attention_backend("pallas") does on CPU) to run under TPU interpret mode, which simulates the
DMAs and semaphores (and fills scratch buffers with NaN, so a stale read shows in the output).
Shapes: the package legend in jaxllm/__init__.py (R, Q, N, K, G, H, P, Z, M). Kernel-local sizes are
words: ppb (pages_per_block) pages per KV block, bk = ppb * Z keys per block, bq (block_q) query tokens
per ragged query block, and `rows` the query rows of one kv head in a program: G (decode) or bq * G
(ragged, row r = token r // G of the block, head r % G of the group).

Design (why):
- KV blocks of hundreds of keys, not one page. A 16-token page is a 4 KiB DMA and a 16-wide matmul,
  far too little work per grid step (~0.35 us of fixed cost each). A block is `pages_per_block` pages
  (default: bk of about 256 keys); since a sequence's pages are scattered over the pool, BlockSpec
  index maps cannot express it, so the pools stay in HBM (memory_space=pl.ANY) and the kernel copies
  the block's pages with one pltpu.make_async_copy each into a VMEM buffer [ppb, Z, H], read as the
  block [bk, H]. Head-major is what makes this cheap: one kv head's page k_pages[h, page] is a
  contiguous [Z, H] tile, so every copy is one dense DMA, and the block's last two dims (Z * ppb keys on
  sublanes, H on lanes) are the TPU's native (8, 128) tiling for Z >= 8 (16 for bf16) and H = 128.
- Double buffering: two VMEM slots per K and V, one DMA semaphore per slot. A program walks a list of
  KV blocks -- decode: (kv head, block) for its sequence; ragged: (sequence, kv head, block) for the
  sequences with rows in its query block -- and starts the next block's copies before waiting for and
  computing on the current one, so HBM reads overlap compute. Only a program's first block is exposed.
  No program prefetches for another (JAX's kernel does, across grid steps), so the single grid axis is
  "parallel" and may be split across TensorCores (megacore) without deadlock.
- Only pages that are needed are copied: up to the sequence's length (decode), up to the causal limit
  of the block's last row of that sequence (ragged); a sequence without rows in a query block costs
  that block nothing, and the page table's padding is never read. The unused tail of a buffer slot
  keeps whatever an earlier block left there, so every key past the copied pages is masked and its
  value zeroed like any slot past kv_len.
- q is regrouped by kv head, [.., K, rows, H], so each kv head's queries are one 2D matrix: every matmul
  is a plain 2D dot of [rows, H] x [bk, H]^T, and a GQA group shares one copy of its K/V block.
- Online softmax (Milakov & Gimelshein 2018; FlashAttention) across a program's blocks, with fp32
  m / l / acc per kv head in VMEM scratch; masked keys get probability exactly 0 (a row with nothing
  valid keeps l = 0 and outputs 0), and values past the valid keys are zeroed (0 * NaN = NaN).
- Ragged cost: a query block's rows are scored against each of its sequences' keys and masked to that
  sequence's rows, so a block holding many one-row (decode) sequences spends bq x the MXU work those rows
  need; HBM traffic, what bounds attention, stays exact. Decode-only steps use the decode kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxllm.kernels.reference import MASK_VALUE, check_shapes

BLOCK_KEYS = 256  # default keys per KV block (pages_per_block = BLOCK_KEYS // Z)


def _pages_per_block(pages_per_block: int | None, Z: int, M: int) -> int:
  """pages_per_block, or by default bk of about BLOCK_KEYS keys (never more pages than a sequence has)."""
  if pages_per_block is None:
    return max(1, min(M, BLOCK_KEYS // Z))
  if pages_per_block < 1:
    raise ValueError(f"tpu paged attention: pages_per_block must be >= 1, got {pages_per_block}")
  return pages_per_block


def _block_dma(action, pt_ref, row, M, first, count, kh, slot, k_hbm, v_hbm, k_buf, v_buf, sem):
  """Start (action "start") or wait for ("wait") the copies of one KV block: pages first .. first+count-1
  of page-table row `row` (pt_ref is the [R, M] table flattened), kv head kh, into buffer slot `slot`
  (page j of the block into k_buf[slot, j]). A wait rebuilds the same descriptors, so it waits for
  exactly the copies that were started; sem [2 (K, V), 2 slots] counts them."""

  def one(j, carry):
    page = pt_ref[row * M + first + j]
    for i, (hbm, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
      copy = pltpu.make_async_copy(hbm.at[kh, page], buf.at[slot, j], sem.at[i, slot])
      if action == "start":
        copy.start()
      else:
        copy.wait()
    return carry

  jax.lax.fori_loop(0, count, one, 0)


def _online_softmax_step(q, k, v, valid, kv_valid, m_ref, l_ref, acc_ref, kh, scale):
  """One kv head, one KV block. q [rows, H]; k, v [bk, H]; valid [rows, bk]; kv_valid [bk, 1].

  m_ref, l_ref [K, rows, 1] and acc_ref [K, rows, H] are fp32 running max / denominator / numerator.
  Masked keys get probability exactly 0 (so a row with nothing valid yet keeps l = 0), and values of
  invalid keys are zeroed, since their slots may hold anything (0 * NaN = NaN).
  """
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  s = jnp.where(valid, s, MASK_VALUE)  # [rows, bk]
  m_prev = m_ref[kh]  # [rows, 1]
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


def _scratch(K, rows, H, ppb, Z, dtype):
  """Two-slot K and V block buffers, their DMA semaphores, and the fp32 m / l / acc."""
  return [
    pltpu.VMEM((2, ppb, Z, H), dtype),
    pltpu.VMEM((2, ppb, Z, H), dtype),
    pltpu.SemaphoreType.DMA((2, 2)),
    pltpu.VMEM((K, rows, 1), jnp.float32),
    pltpu.VMEM((K, rows, 1), jnp.float32),
    pltpu.VMEM((K, rows, H), jnp.float32),
  ]


# ---------------------------------------------------------------------------------------------------
# Decode: grid (R,); program s walks steps t = (kv head t // nb, KV block t % nb), nb = its blocks per head.


def _decode_kernel(
  kv_lens_ref, pt_ref, q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sem, m_ref, l_ref, acc_ref, *, K, M, Z, ppb
):
  # q_ref, o_ref [K, G, H]; k_hbm, v_hbm [K, P, Z, H] (HBM); k_buf, v_buf [2, ppb, Z, H].
  s = pl.program_id(0)
  _, G, H = q_ref.shape
  bk = ppb * Z
  kv_len = kv_lens_ref[s]
  n_pages = jnp.minimum(pl.cdiv(kv_len, Z), M)
  nb = pl.cdiv(n_pages, ppb)
  dma = functools.partial(
    _block_dma, pt_ref=pt_ref, row=s, M=M, k_hbm=k_hbm, v_hbm=v_hbm, k_buf=k_buf, v_buf=v_buf, sem=sem
  )

  def copies(action, t, slot):
    b = jax.lax.rem(t, nb)
    dma(action, first=b * ppb, count=jnp.minimum(ppb, n_pages - b * ppb), kh=jax.lax.div(t, nb), slot=slot)

  _init(m_ref, l_ref, acc_ref)

  @pl.when(nb > 0)
  def _():
    copies("start", 0, 0)

  def step(t, carry):
    slot = jax.lax.rem(t, 2)

    @pl.when(t + 1 < K * nb)
    def _():
      copies("start", t + 1, 1 - slot)  # the next block streams in while this one is computed

    copies("wait", t, slot)
    kh, b = jax.lax.div(t, nb), jax.lax.rem(t, nb)
    kv_valid = b * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < kv_len  # [bk, 1]
    valid = jnp.broadcast_to(kv_valid.reshape(1, bk), (G, bk))
    _online_softmax_step(
      q_ref[kh],
      k_buf[slot].reshape(bk, H),
      v_buf[slot].reshape(bk, H),
      valid,
      kv_valid,
      m_ref,
      l_ref,
      acc_ref,
      kh,
      H**-0.5,
    )
    return carry

  jax.lax.fori_loop(0, K * nb, step, 0)
  _finish(o_ref, l_ref, acc_ref)


@functools.partial(jax.jit, static_argnames=("interpret", "pages_per_block"))
def paged_decode_attention(q, k_pages, v_pages, kv_lens, page_table, *, interpret=False, pages_per_block=None):
  """q [R, N, H] -> [R, N, H]; semantics in jaxllm/kernels/reference.py. pages_per_block: pages per KV
  block (default about 256 keys)."""
  check_shapes("tpu paged_decode_attention", q, k_pages, v_pages, kv_lens, page_table)
  R, N, H = q.shape
  K, _, Z, _ = k_pages.shape
  M = page_table.shape[1]
  if R != page_table.shape[0]:
    raise ValueError(f"tpu paged_decode_attention: q has {R} rows but page_table {page_table.shape[0]}")
  G = N // K
  ppb = _pages_per_block(pages_per_block, Z, M)
  qg = q.reshape(R, K, G, H)

  q_spec = pl.BlockSpec((pl.squeezed, K, G, H), lambda s, *_: (s, 0, 0, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  out = pl.pallas_call(
    functools.partial(_decode_kernel, K=K, M=M, Z=Z, ppb=ppb),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(R,),
      in_specs=[q_spec, any_spec, any_spec],
      out_specs=q_spec,
      scratch_shapes=_scratch(K, G, H, ppb, Z, k_pages.dtype),
    ),
    out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
    interpret=interpret,
  )(kv_lens.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1), qg, k_pages, v_pages)
  return out.reshape(R, N, H)


# ---------------------------------------------------------------------------------------------------
# Ragged (mixed prefill + decode): grid (query blocks of bq tokens,). The sequences with rows in block
# i are entries first[i] .. stop[i]-1 of `order` (live sequences with rows first, in row order); all
# three are scalar-prefetched. Program i walks, for each of those sequences, steps t = (kv head t // nb,
# KV block t % nb), nb = cdiv(pages up to the causal limit of the sequence's last row in the block, ppb).


def _ragged_seq(w, i, cu_ref, kv_lens_ref, order_ref, *, M, Z, ppb, bq):
  """Sequence entry w of query block i: (sequence id, its first row, its end row, kv_len, the furthest
  key position any of its rows in the block attends to, pages that covers, KV blocks per head)."""
  s = order_ref[w]
  start, end, kv_len = cu_ref[s], cu_ref[s + 1], kv_lens_ref[s]
  last_row = jnp.minimum(end, (i + 1) * bq) - 1
  last_key = kv_len - (end - start) + (last_row - start)
  n_pages = jnp.clip(pl.cdiv(last_key + 1, Z), 0, M)
  nb = jnp.maximum(pl.cdiv(n_pages, ppb), 1)  # >= 1 even if kv_len < q_len (bad input): rows output 0
  return s, start, end, kv_len, last_key, n_pages, nb


def _ragged_kernel(
  kv_lens_ref,
  pt_ref,
  cu_ref,
  order_ref,
  first_ref,
  stop_ref,
  q_ref,
  k_hbm,
  v_hbm,
  o_ref,
  k_buf,
  v_buf,
  sem,
  m_ref,
  l_ref,
  acc_ref,
  *,
  K,
  M,
  Z,
  G,
  ppb,
  bq,
):
  # q_ref, o_ref [K, bq * G, H]; k_hbm, v_hbm [K, P, Z, H] (HBM); k_buf, v_buf [2, ppb, Z, H].
  i = pl.program_id(0)
  H = q_ref.shape[2]
  bk = ppb * Z
  w_first, w_stop = first_ref[i], stop_ref[i]
  seq = functools.partial(
    _ragged_seq, i=i, cu_ref=cu_ref, kv_lens_ref=kv_lens_ref, order_ref=order_ref, M=M, Z=Z, ppb=ppb, bq=bq
  )

  def copies(action, w, t, slot):
    s, _, _, _, _, n_pages, nb = seq(w)
    b = jax.lax.rem(t, nb)
    _block_dma(
      action,
      pt_ref,
      s,
      M,
      b * ppb,
      jnp.clip(n_pages - b * ppb, 0, ppb),
      jax.lax.div(t, nb),
      slot,
      k_hbm,
      v_hbm,
      k_buf,
      v_buf,
      sem,
    )

  _init(m_ref, l_ref, acc_ref)

  @pl.when(w_first < w_stop)
  def _():
    copies("start", w_first, 0, 0)

  tok = i * bq + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (bq * G, 1), 0), G)  # [bq * G, 1]

  def one_seq(w, n_done):
    _, start, end, kv_len, last_key, _, nb = seq(w)
    qpos = kv_len - (end - start) + (tok - start)  # [bq * G, 1]
    own = (tok >= start) & (tok < end)

    def step(t, n_done):
      slot = jax.lax.rem(n_done, 2)

      @pl.when(t + 1 < K * nb)
      def _():
        copies("start", w, t + 1, 1 - slot)

      @pl.when((t + 1 == K * nb) & (w + 1 < w_stop))
      def _():
        copies("start", w + 1, 0, 1 - slot)  # the next sequence's first block

      copies("wait", w, t, slot)
      kh, b = jax.lax.div(t, nb), jax.lax.rem(t, nb)
      kpos = b * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # [1, bk]
      valid = own & (kpos <= qpos)  # [bq * G, bk]; qpos < kv_len
      kv_valid = b * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0) <= last_key  # copied keys
      _online_softmax_step(
        q_ref[kh],
        k_buf[slot].reshape(bk, H),
        v_buf[slot].reshape(bk, H),
        valid,
        kv_valid,
        m_ref,
        l_ref,
        acc_ref,
        kh,
        H**-0.5,
      )
      return n_done + 1

    return jax.lax.fori_loop(0, K * nb, step, n_done)

  jax.lax.fori_loop(w_first, w_stop, one_seq, 0)
  _finish(o_ref, l_ref, acc_ref)


@functools.partial(jax.jit, static_argnames=("interpret", "block_q", "pages_per_block"))
def ragged_paged_attention(
  q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, interpret=False, block_q=64, pages_per_block=None
):
  """q [Q, N, H] -> [Q, N, H]; semantics in jaxllm/kernels/reference.py. block_q: query tokens per
  program (a multiple of 8, capped at Q rounded up to 8); pages_per_block: pages per KV block (default
  about 256 keys)."""
  check_shapes("tpu ragged_paged_attention", q, k_pages, v_pages, kv_lens, page_table)
  Q, N, H = q.shape
  K, _, Z, _ = k_pages.shape
  R, M = page_table.shape
  if cu_q_lens.shape != (R + 1,):
    raise ValueError(f"tpu ragged_paged_attention: cu_q_lens must be [R + 1] = [{R + 1}], got {cu_q_lens.shape}")
  if block_q < 8 or block_q % 8:
    raise ValueError(
      f"tpu ragged_paged_attention: block_q must be a positive multiple of 8 (the TPU sublane tile), got {block_q}"
    )
  G = N // K
  ppb = _pages_per_block(pages_per_block, Z, M)
  bq = min(block_q, pl.cdiv(Q, 8) * 8)
  nb = pl.cdiv(Q, bq)
  Qp = nb * bq  # padded rows belong to no sequence
  qg = jnp.pad(q, ((0, Qp - Q), (0, 0), (0, 0))).reshape(Qp, K, G, H)
  qg = qg.transpose(1, 0, 2, 3).reshape(K, Qp * G, H)  # [K, (token, g), H]

  cu = cu_q_lens.astype(jnp.int32)
  has_rows = (cu[1:] > cu[:-1]) & (jnp.arange(R) < num_seqs)  # [R]
  order = jnp.argsort(~has_rows, stable=True).astype(jnp.int32)
  listed = jnp.arange(R) < jnp.sum(has_rows)  # order's entries with rows
  big = jnp.iinfo(jnp.int32).max
  starts = jnp.where(listed, cu[:-1][order], big)  # both increasing
  ends = jnp.where(listed, cu[1:][order], big)
  blk = jnp.arange(nb, dtype=jnp.int32) * bq
  first = jnp.searchsorted(ends, blk, side="right").astype(jnp.int32)  # first ending after blk
  stop = jnp.searchsorted(starts, blk + bq, side="left").astype(jnp.int32)  # all starting before its end

  q_spec = pl.BlockSpec((K, bq * G, H), lambda i, *_: (0, i, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  out = pl.pallas_call(
    functools.partial(_ragged_kernel, K=K, M=M, Z=Z, G=G, ppb=ppb, bq=bq),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=6,
      grid=(nb,),
      in_specs=[q_spec, any_spec, any_spec],
      out_specs=q_spec,
      scratch_shapes=_scratch(K, bq * G, H, ppb, Z, k_pages.dtype),
    ),
    out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
    interpret=interpret,
  )(kv_lens.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1), cu, order, first, stop, qg, k_pages, v_pages)
  out = out.reshape(K, Qp, G, H).transpose(1, 0, 2, 3).reshape(Qp, N, H)
  return out[:Q]
