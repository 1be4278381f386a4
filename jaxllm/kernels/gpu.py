"""Pallas GPU (Triton lowering) paged attention on the head-major pool [K, P, Z, H].

Same interface and semantics as jaxllm/kernels/reference.py; `interpret=True` runs it on CPU.
Shapes: the package legend in jaxllm/__init__.py (R, Q, N, K, G, H, P, Z, M); kernel-local tile
sizes are words: bq query tokens and bk keys per tile, Gp = G padded to a power of two, and S the
decode's number of kv splits.

Design (why):
- One program per (sequence, kv head, kv split) for decode, per (query tile, kv head) for ragged. All
  G query heads of a GQA group ride in one program, so each K/V page is read from HBM once per group.
  A program sees its kv head's pool as [P, Z, H] (head-major: one BlockSpec picks the head).
- Each loop iteration gathers `pages_per_block` pages by id (a vector load of the page table, then an
  indexed load `k_ref[page_ids]` of whole contiguous [Z, H] pages), giving a [bk, H] tile with
  bk (block_k) = pages_per_block * Z.
- Split-K decode (flash-decoding, Dao et al. 2023): with few sequences, R * K programs leave most SMs
  idle while each walks a long context. The decode grid is (R, K, S): split j walks a contiguous range of
  the sequence's KV blocks and writes its unnormalised partial (m, l, acc) in fp32; a small jnp combine
  merges the S partials (log-sum-exp: weights exp(m_j - max m), o = sum w_j acc_j / sum w_j l_j). A split
  past the sequence's length is empty (m = MASK_VALUE, l = 0, acc = 0) and gets weight 0. The default S
  (`decode_num_splits`) comes from static shapes only: 1 when R * K alone fills the GPU, else enough
  splits to reach ~TARGET_PROGRAMS programs, keeping >= MIN_SPLIT_BLOCKS KV blocks per split.
- Triton's dot needs every matmul dim >= 16 and power-of-two tile dims: the G heads are zero-padded to a
  power of two (decode: to >= 16), page size Z and head dim H must be powers of two, and bk >= 16 on GPU.
- Online softmax (FlashAttention) with fp32 m / l / acc; masked keys get probability exactly 0 and
  values past the sequence's length are zeroed (their slots may hold anything, and 0 * NaN = NaN).
- Ragged output rows are written only by the program whose sequence owns them; the output buffer is a
  zeros array aliased in, so padding rows read back as 0 instead of uninitialised memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.buckets import pow2_bucket
from jaxllm.kernels.reference import MASK_VALUE, check_shapes

TARGET_PROGRAMS = 128  # programs that fill a GPU: ~1 per SM of an A100 (108) / H100 (132)
MIN_SPLIT_BLOCKS = 4  # KV blocks per split at least, so a split's q load and partial write amortise


def _check_shapes(name, q, k_pages, v_pages, kv_lens, page_table):
  check_shapes(f"gpu {name}", q, k_pages, v_pages, kv_lens, page_table)
  _, _, Z, H = k_pages.shape
  for what, n in (("page size", Z), ("head dim", H)):
    if n != pow2_bucket(n):
      raise ValueError(
        f"gpu {name}: {what} {n} is not a power of two (Triton tiles must be); "
        "use a power-of-two page size, or the 'reference' backend"
      )


def _attend_block(q, k, v, valid, kv_valid, m, l, acc, scale):
  """q [rows, H]; k, v [bk, H]; valid [rows, bk]; kv_valid [bk]; running m, l [rows], acc [rows, H] (fp32)."""
  fp32 = q.dtype == jnp.float32
  s = plgpu.dot(q, k, trans_b=True, allow_tf32=not fp32).astype(jnp.float32) * scale
  s = jnp.where(valid, s, MASK_VALUE)
  m_new = jnp.maximum(m, s.max(axis=-1))
  p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
  alpha = jnp.exp(m - m_new)
  v = jnp.where(kv_valid[:, None], v, jnp.zeros((), v.dtype))
  pv = plgpu.dot(p.astype(v.dtype), v, allow_tf32=not fp32).astype(jnp.float32)
  return m_new, alpha * l + p.sum(axis=-1), alpha[:, None] * acc + pv


def _block_pages(Z: int, pages_per_block: int | None, interpret) -> int:
  """Pages per loop iteration: bk of 64 keys unless told."""
  ppb = pages_per_block or max(1, 64 // Z)
  if ppb != pow2_bucket(ppb):
    raise ValueError(f"gpu paged attention: pages_per_block {ppb} is not a power of two")
  if not interpret and ppb * Z < 16:
    raise ValueError(
      f"gpu paged attention: pages_per_block * page size = {ppb * Z} < 16, the "
      "smallest Triton dot; raise pages_per_block"
    )
  return ppb


# ---------------------------------------------------------------------------------------------------
# Decode: grid (R, K, S); split j of sequence s walks its KV blocks j * bps .. (j + 1) * bps - 1 (bps
# blocks per split), clipped to the blocks its length needs.


def decode_num_splits(R: int, K: int, M: int, pages_per_block: int) -> int:
  """The default kv splits for decode, from static shapes: 1 when R * K programs already reach
  TARGET_PROGRAMS; otherwise enough to get there, but at most one split per MIN_SPLIT_BLOCKS of the
  cdiv(M, pages_per_block) KV blocks a full page table holds (short contexts gain nothing from splitting,
  and pay the partials' write and combine)."""
  if R * K >= TARGET_PROGRAMS:
    return 1
  blocks = pl.cdiv(M, pages_per_block)
  return max(1, min(pl.cdiv(TARGET_PROGRAMS, R * K), blocks // MIN_SPLIT_BLOCKS))


def _decode_kernel(kv_lens_ref, pt_ref, q_ref, k_ref, v_ref, *out_refs, Z, ppb, bps):
  # q_ref [Gp, H]; k_ref, v_ref [P, Z, H] (this program's kv head); pt_ref [R, Mp], Mp = M padded.
  # out_refs: o_ref [Gp, H] (one split), or the partials m_ref, l_ref [Gp] and acc_ref [Gp, H] (fp32).
  s, j = pl.program_id(0), pl.program_id(2)
  Gp, H = q_ref.shape
  bk = ppb * Z
  kv_len = kv_lens_ref[s]
  q = q_ref[...]

  def body(i, carry):
    m, l, acc = carry
    ids = pt_ref[s, pl.ds(i * ppb, ppb)]  # [ppb] page ids
    k = k_ref[ids].reshape(bk, H)
    v = v_ref[ids].reshape(bk, H)
    kv_valid = i * bk + jnp.arange(bk) < kv_len
    valid = jnp.broadcast_to(kv_valid[None, :], (Gp, bk))
    return _attend_block(q, k, v, valid, kv_valid, m, l, acc, H**-0.5)

  init = (jnp.full((Gp,), MASK_VALUE, jnp.float32), jnp.zeros((Gp,), jnp.float32), jnp.zeros((Gp, H), jnp.float32))
  lo = j * bps  # empty when lo >= hi
  hi = jnp.minimum(lo + bps, pl.cdiv(kv_len, bk))
  m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
  if len(out_refs) == 1:
    out_refs[0][...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(out_refs[0].dtype)
  else:
    m_ref, l_ref, acc_ref = out_refs
    m_ref[...], l_ref[...], acc_ref[...] = m, l, acc


def _combine_splits(m, l, acc):
  """Merge S partial softmaxes (flash-decoding): m, l [..., S, Gp], acc [..., S, Gp, H] -> [..., Gp, H].
  Empty splits (l = 0) get weight 0; with none non-empty the row is 0 (a padding row)."""
  m_max = m.max(axis=-2, keepdims=True)
  w = jnp.where(l > 0.0, jnp.exp(m - m_max), 0.0)  # [..., S, Gp]
  l_all = (w * l).sum(axis=-2)
  acc_all = (w[..., None] * acc).sum(axis=-3)
  return acc_all / jnp.where(l_all == 0.0, 1.0, l_all)[..., None]


@functools.partial(jax.jit, static_argnames=("interpret", "pages_per_block", "num_splits", "num_warps", "num_stages"))
def paged_decode_attention(
  q,
  k_pages,
  v_pages,
  kv_lens,
  page_table,
  *,
  interpret=False,
  pages_per_block=None,
  num_splits=None,
  num_warps=4,
  num_stages=2,
):
  """q [R, N, H] -> [R, N, H]; semantics in jaxllm/kernels/reference.py. num_splits: kv splits per
  sequence (flash-decoding; default `decode_num_splits`, capped at the KV blocks a page table holds)."""
  _check_shapes("paged_decode_attention", q, k_pages, v_pages, kv_lens, page_table)
  R, N, H = q.shape
  K, P, Z, _ = k_pages.shape
  M = page_table.shape[1]
  G = N // K
  Gp = pow2_bucket(G, 16)
  ppb = _block_pages(Z, pages_per_block, interpret)
  blocks = pl.cdiv(M, ppb)
  if num_splits is not None and num_splits < 1:
    raise ValueError(f"gpu paged_decode_attention: num_splits must be >= 1, got {num_splits}")
  S = min(blocks, num_splits or decode_num_splits(R, K, M, ppb))
  bps = pl.cdiv(blocks, S)  # KV blocks per split
  Mp = blocks * ppb  # M padded to whole loop blocks
  pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, Mp - M)))  # with the null page
  qg = jnp.pad(q.reshape(R, K, G, H), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))

  q_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, Gp, H), lambda s, k, j: (s, k, 0, 0))
  kv_spec = pl.BlockSpec((pl.squeezed, P, Z, H), lambda s, k, j: (k, 0, 0, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda s, k, j: (0,) * len(shape))
  if S == 1:
    out_specs, out_shape = q_spec, jax.ShapeDtypeStruct(qg.shape, q.dtype)
  else:
    part = lambda *shape: pl.BlockSpec((pl.squeezed,) * 3 + shape, lambda s, k, j: (s, k, j) + (0,) * len(shape))
    f32 = lambda *shape: jax.ShapeDtypeStruct((R, K, S) + shape, jnp.float32)
    out_specs, out_shape = [part(Gp), part(Gp), part(Gp, H)], [f32(Gp), f32(Gp), f32(Gp, H)]
  out = pl.pallas_call(
    functools.partial(_decode_kernel, Z=Z, ppb=ppb, bps=bps),
    grid=(R, K, S),
    in_specs=[whole((R,)), whole((R, Mp)), q_spec, kv_spec, kv_spec],
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
  )(kv_lens.astype(jnp.int32), pt, qg, k_pages, v_pages)
  if S > 1:
    out = _combine_splits(*out).astype(q.dtype)  # [R, K, Gp, H]
  return out[:, :, :G].reshape(R, N, H)


# ---------------------------------------------------------------------------------------------------
# Ragged (mixed prefill + decode): grid (tiles, K). A tile is bq consecutive query rows of one
# sequence, tile j of sequence s covering its rows cu[s] + j*bq ...; the tile list
# (tile_seq, tile_j, built with jnp in the wrapper) has the static bound cdiv(Q, bq) + R entries, so
# the grid does not grow as R * Q / bq; programs past the real tile count exit at once.


def _ragged_kernel(
  kv_lens_ref,
  pt_ref,
  cu_ref,
  tile_seq_ref,
  tile_j_ref,
  n_tiles_ref,
  q_ref,
  o_in_ref,
  k_ref,
  v_ref,
  o_ref,
  *,
  Z,
  ppb,
  bq,
):
  del o_in_ref  # aliased to o_ref: the zeros that padding rows keep
  # q_ref, o_ref [Qp, Gp, H] (this program's kv head); k_ref, v_ref [P, Z, H].
  t = pl.program_id(0)
  s, j = tile_seq_ref[t], tile_j_ref[t]
  _, Gp, H = q_ref.shape
  bk, bqg = ppb * Z, bq * Gp  # keys per loop step; query rows (token, head) of the tile
  start, end, kv_len = cu_ref[s], cu_ref[s + 1], kv_lens_ref[s]
  r0 = start + j * bq

  @pl.when(t < n_tiles_ref[0])
  def _():
    rows = pl.ds(r0, bq)
    tok = r0 + jnp.arange(bq)  # [bq]
    own = tok < end
    q = plgpu.load(q_ref.at[rows], mask=own[:, None, None], other=0).reshape(bqg, H)
    qpos = jnp.broadcast_to((kv_len - (end - start) + (tok - start))[:, None], (bq, Gp)).reshape(bqg)
    own_r = jnp.broadcast_to(own[:, None], (bq, Gp)).reshape(bqg)
    last = kv_len - (end - start) + (jnp.minimum(end, r0 + bq) - 1 - start)  # furthest key needed

    def body(i, carry):
      m, l, acc = carry
      ids = pt_ref[s, pl.ds(i * ppb, ppb)]
      k = k_ref[ids].reshape(bk, H)
      v = v_ref[ids].reshape(bk, H)
      kpos = i * bk + jnp.arange(bk)
      kv_valid = kpos < kv_len
      valid = own_r[:, None] & (kpos[None, :] <= qpos[:, None]) & kv_valid[None, :]
      return _attend_block(q, k, v, valid, kv_valid, m, l, acc, H**-0.5)

    init = (jnp.full((bqg,), MASK_VALUE, jnp.float32), jnp.zeros((bqg,), jnp.float32), jnp.zeros((bqg, H), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, pl.cdiv(last + 1, bk), body, init)
    o = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).reshape(bq, Gp, H)
    plgpu.store(o_ref.at[rows], o.astype(o_ref.dtype), mask=own[:, None, None])


@functools.partial(jax.jit, static_argnames=("interpret", "block_q", "pages_per_block", "num_warps", "num_stages"))
def ragged_paged_attention(
  q,
  k_pages,
  v_pages,
  kv_lens,
  page_table,
  cu_q_lens,
  num_seqs,
  *,
  interpret=False,
  block_q=16,
  pages_per_block=None,
  num_warps=4,
  num_stages=2,
):
  """q [Q, N, H] -> [Q, N, H]; semantics in jaxllm/kernels/reference.py."""
  _check_shapes("ragged_paged_attention", q, k_pages, v_pages, kv_lens, page_table)
  Q, N, H = q.shape
  K, P, Z, _ = k_pages.shape
  R, M = page_table.shape
  if cu_q_lens.shape != (R + 1,):
    raise ValueError(f"gpu ragged_paged_attention: cu_q_lens must be [R + 1] = [{R + 1}], got {cu_q_lens.shape}")
  G, bq = N // K, pow2_bucket(block_q)
  Gp = pow2_bucket(G)
  ppb = _block_pages(Z, pages_per_block, interpret)
  Mp = pl.cdiv(M, ppb) * ppb  # M padded to whole loop blocks
  pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, Mp - M)))
  Qp = Q + bq  # a tile starting at any row stays in bounds
  qg = jnp.pad(q.reshape(Q, K, G, H), ((0, bq), (0, 0), (0, Gp - G), (0, 0)))

  cu = cu_q_lens.astype(jnp.int32)
  tiles = jnp.where(jnp.arange(R) < num_seqs, pl.cdiv(cu[1:] - cu[:-1], bq), 0)  # [R] tiles per seq
  ends = jnp.cumsum(tiles)
  nt = pl.cdiv(Q, bq) + R  # >= sum(tiles) for any ragged batch
  t = jnp.arange(nt, dtype=jnp.int32)
  tile_seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), R - 1).astype(jnp.int32)
  tile_j = (t - (ends - tiles)[tile_seq]).astype(jnp.int32)

  grid = (nt, K)
  q_spec = pl.BlockSpec((Qp, pl.squeezed, Gp, H), lambda t, k: (0, k, 0, 0))
  kv_spec = pl.BlockSpec((pl.squeezed, P, Z, H), lambda t, k: (k, 0, 0, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda t, k: (0,) * len(shape))
  out = pl.pallas_call(
    functools.partial(_ragged_kernel, Z=Z, ppb=ppb, bq=bq),
    grid=grid,
    in_specs=[
      whole((R,)),
      whole((R, Mp)),
      whole((R + 1,)),
      whole((nt,)),
      whole((nt,)),
      whole((1,)),
      q_spec,
      q_spec,
      kv_spec,
      kv_spec,
    ],
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
    input_output_aliases={7: 0},
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
  )(
    kv_lens.astype(jnp.int32),
    pt,
    cu,
    tile_seq,
    tile_j,
    ends[-1:].astype(jnp.int32),
    qg,
    jnp.zeros_like(qg),
    k_pages,
    v_pages,
  )
  return out[:Q, :, :G].reshape(Q, N, H)
