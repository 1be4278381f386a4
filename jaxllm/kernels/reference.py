"""Pure-jnp paged attention: the definition the Pallas kernels are tested against, and the CPU path.

The KV cache lives in fixed-size pages (vLLM's PagedAttention, SOSP'23); a sequence's keys are the
pages its page-table row names, in order. Page 0 is the null page: the engine never gives it to a live
sequence and pads page tables with it, so nothing here may let its contents (or any slot past a
sequence's length) reach the output -- the tests fill all of those with NaN.

Shapes: the package legend in jaxllm/__init__.py (R, Q, N, K, G, H, P, Z, M); a sequence holds at
most M * Z keys.

  paged_decode_attention(q [R, N, H], k_pages [K, P, Z, H], v_pages [K, P, Z, H],
                         kv_lens [R] int32, page_table [R, M] int32) -> [R, N, H]
    One query per sequence, attending to kv positions 0 .. kv_lens[s]-1 (the query is the token at
    position kv_lens[s]-1, already written to its page). kv_lens[s] == 0 marks a padding row: output 0.

  ragged_paged_attention(q [Q, N, H], k_pages, v_pages, kv_lens [R] int32, page_table [R, M] int32,
                         cu_q_lens [R+1] int32, num_seqs int32 scalar) -> [Q, N, H]
    Mixed prefill + decode (a chunked prefill is the same thing): sequence s < num_seqs owns query rows
    cu_q_lens[s] : cu_q_lens[s+1], which are the LAST q_len positions of its kv, i.e. positions
    kv_lens[s] - q_len .. kv_lens[s] - 1, attended causally. The caller has already written their K/V
    into the pages. Rows from cu_q_lens[num_seqs] on are padding: output 0.

Both: softmax scale H**-0.5, scores / softmax / accumulation in fp32, output in q's dtype.

Both walk the keys in chunks of `key_chunk_pages` pages (128-256 keys) with an online softmax
(Milakov & Gimelshein 2018; FlashAttention), for as many chunks as the longest sequence needs -- a
dynamic trip count. So the cost follows the live context, not the page table's width M: the engine
passes one fixed M (max_seq_len's pages) and M is no compile dimension (sglang-jax does the same).

The pool is head-major, [K, P, Z, H] (the layout of JAX's TPU paged_attention): one kv head's page is a
contiguous [Z, H] tile, so a TPU kernel's block is (keys, head dim) -- the (8, 128) tiling for
Z >= 8, H = 128 -- and the XLA path gathers a key chunk into [K, R, keys, H], whose batched matmuls run
over contiguous keys. Token-major [P, Z, K, H] makes XLA on CPU strided-copy every gathered page
(figures: docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Finite "minus infinity" for masked scores: a row with every key masked (padding) gives a uniform
# softmax instead of NaN. The model's dense attention uses the same value.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Keys per online-softmax step of the XLA path (rounded to whole pages). Decode: big chunks, as a loop
# iteration has a fixed cost; ragged: a chunk is scored against whole 64-row query blocks, so keys
# past the causal limit cost matmul work, and smaller chunks waste less.
DECODE_KEY_CHUNK, RAGGED_KEY_CHUNK = 256, 128


def check_shapes(who: str, q, k_pages, v_pages, kv_lens, page_table) -> None:
  """ValueError in plain words unless the arrays have the interface's shapes (the kernels call it)."""
  if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
    raise ValueError(
      f"{who}: k_pages and v_pages must both be [K, P, Z, H] (kv head major); got {k_pages.shape} and {v_pages.shape}"
    )
  K, _, _, H = k_pages.shape
  if q.ndim != 3 or q.shape[2] != H or q.shape[1] % K:
    raise ValueError(f"{who}: q must be [rows, N, {H}] with N a multiple of the {K} kv heads; got {q.shape}")
  if page_table.ndim != 2 or kv_lens.shape != page_table.shape[:1]:
    raise ValueError(f"{who}: page_table must be [R, M] and kv_lens [R]; got {page_table.shape} and {kv_lens.shape}")


def key_chunk_pages(Z: int, keys: int = DECODE_KEY_CHUNK) -> int:
  return max(1, keys // Z)


def gather_pages(pages, page_table):
  """pages [K, P, Z, H], page_table [..., m] -> [K, ..., m * Z, H] (each row's keys, contiguous)."""
  K, P, Z, H = pages.shape
  # take over [K, P, Z*H] rows: XLA:CPU copies whole [Z*H] rows (faster than pages[:, table])
  rows = jnp.take(pages.reshape(K, P, Z * H), page_table, axis=1, mode="clip")
  return rows.reshape(K, *page_table.shape[:-1], page_table.shape[-1] * Z, H)


def _online_step(carry, s, valid, pv):
  """Fold one key chunk into the running (m, l, acc) of an online softmax.

  s [..., C] fp32 scores, valid [..., C] (broadcastable); pv(p) -> [..., H] multiplies the chunk's
  probabilities p [..., C] with its values. Invalid keys get probability exactly 0 (a row with
  nothing valid yet keeps l = 0).
  """
  m, l, acc = carry
  s = jnp.where(valid, s, MASK_VALUE)
  m_new = jnp.maximum(m, s.max(axis=-1))
  p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
  alpha = jnp.exp(m - m_new)
  return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv(p)


def _init_carry(shape, H):
  return (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, H), jnp.float32))


def _finish(l, acc):
  return acc / jnp.where(l == 0.0, 1.0, l)[..., None]  # no valid key -> 0, not a uniform average


def _chunked_table(page_table, cp):
  """The page table padded (with the null page) to whole key chunks of cp pages."""
  M = page_table.shape[-1]
  pad = [(0, 0)] * (page_table.ndim - 1) + [(0, -(-M // cp) * cp - M)]
  return jnp.pad(page_table, pad)


@jax.jit
def paged_decode_attention(q, k_pages, v_pages, kv_lens, page_table):
  """q [R, N, H] -> [R, N, H]; see the module docstring.

  Batched over (K, R) in that order: a gathered key chunk is [K, R, C, H] (C keys), so the matmuls
  read contiguous keys per (head, sequence)."""
  R, N, H = q.shape
  K, _, Z, _ = k_pages.shape
  cp = key_chunk_pages(Z)
  C = cp * Z
  pt = _chunked_table(page_table, cp)
  qg = q.reshape(R, K, N // K, H).transpose(1, 0, 2, 3).astype(jnp.float32) * (H**-0.5)  # [K, R, G, H]

  def chunk(c, carry):
    ids = jax.lax.dynamic_slice_in_dim(pt, c * cp, cp, axis=1)  # [R, cp]
    k, v = gather_pages(k_pages, ids), gather_pages(v_pages, ids)  # [K, R, C, H]
    kv_valid = c * C + jnp.arange(C)[None, :] < kv_lens[:, None]  # [R, C]
    s = jnp.einsum("krgh,krch->krgc", qg, k, preferred_element_type=jnp.float32)
    # keys past a sequence's length: zero value too (their slots may hold anything; 0 * NaN = NaN)
    v = jnp.where(kv_valid[None, :, :, None], v, jnp.zeros((), v.dtype)).astype(jnp.float32)
    pv = lambda p: jnp.einsum("krgc,krch->krgh", p, v, preferred_element_type=jnp.float32)
    return _online_step(carry, s, kv_valid[None, :, None, :], pv)

  n_chunks = (jnp.max(kv_lens) + C - 1) // C
  _, l, acc = jax.lax.fori_loop(0, n_chunks, chunk, _init_carry((K, R, N // K), H))
  return _finish(l, acc).transpose(1, 0, 2, 3).reshape(R, N, H).astype(q.dtype)


def query_block_size(Q: int) -> int:
  """Rows per query block of the ragged attention: 64, or Q itself when smaller."""
  return max(1, min(Q, 64))


WAVE_BLOCKS = 8  # query blocks attended together per loop iteration of the ragged XLA path


@jax.jit
def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs):
  """q [Q, N, H] -> [Q, N, H]; see the module docstring.

  Works per query block: each live sequence's rows are cut into blocks of `query_block_size(Q)`
  rows (a sequence's last block is partial; a block never mixes sequences). A loop iteration takes a
  wave of W consecutive blocks and attends them at once, each to its own sequence's keys, chunk by
  chunk up to the wave's furthest causal limit (an inner loop). Both trip counts are dynamic (waves:
  sum over live sequences of ceil(q_len / block) / W; chunks: up to the wave's last needed key), so
  the work is O((Q + num_seqs * block) * context): it grows with the step's tokens and their context,
  not with tokens x sequences or the page table's width, and padding costs nothing. Waves rather
  than single blocks because each loop iteration has a fixed cost on XLA:CPU, which one block per
  iteration pays many times over on a long prefill (docs/benchmarks.md).
  """
  Q, N, H = q.shape
  K, _, Z, _ = k_pages.shape
  G = N // K
  cp = key_chunk_pages(Z, RAGGED_KEY_CHUNK)
  C = cp * Z
  pt = _chunked_table(page_table, cp)
  Bq = query_block_size(Q)
  W = max(1, min(WAVE_BLOCKS, -(-Q // Bq)))
  R = kv_lens.shape[0]
  live = jnp.arange(R) < num_seqs
  q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)  # [R]
  n_blocks = (q_lens + Bq - 1) // Bq  # [R]
  block_end = jnp.cumsum(n_blocks)  # [R] inclusive cumsum
  total = block_end[-1]
  # [K, Q + Bq, G, H], head-major like the pool; Bq spare rows so a block never runs off the end.
  qg = jnp.pad(q.reshape(Q, K, G, H), ((0, Bq), (0, 0), (0, 0), (0, 0))).transpose(1, 0, 2, 3)
  qg = qg.astype(jnp.float32) * (H**-0.5)
  offs = jnp.arange(Bq)

  def wave(w, out):
    b = w * W + jnp.arange(W)  # [W] block ids
    s = jnp.minimum(jnp.searchsorted(block_end, b, side="right"), R - 1)  # each block's sequence
    seq0, end, kv_len = cu_q_lens[s], cu_q_lens[s + 1], kv_lens[s]  # [W]
    start = seq0 + (b - (block_end[s] - n_blocks[s])) * Bq  # [W] first query row
    rows = start[:, None] + offs[None, :]  # [W, Bq]
    own = (rows < end[:, None]) & (b < total)[:, None]
    qpos = (kv_len - (end - seq0))[:, None] + (rows - seq0[:, None])  # [W, Bq] positions
    n_keys = jnp.where(b < total, kv_len - (end - jnp.minimum(end, start + Bq)), 0)  # last own row + 1
    qb = qg[:, jnp.minimum(rows, Q + Bq - 1)]  # [K, W, Bq, G, H]
    tables = pt[s]  # [W, M']

    def chunk(c, carry):
      ids = jax.lax.dynamic_slice_in_dim(tables, c * cp, cp, axis=1)  # [W, cp]
      k, v = gather_pages(k_pages, ids), gather_pages(v_pages, ids)  # [K, W, C, H]
      kpos = c * C + jnp.arange(C)
      kv_valid = kpos[None, :] < kv_len[:, None]  # [W, C]
      valid = own[:, :, None] & (kpos[None, None, :] <= qpos[:, :, None]) & kv_valid[:, None, :]
      sc = jnp.einsum("kwrgh,kwch->kwrgc", qb, k, preferred_element_type=jnp.float32)
      v = jnp.where(kv_valid[None, :, :, None], v, jnp.zeros((), v.dtype)).astype(jnp.float32)
      pv = lambda p: jnp.einsum("kwrgc,kwch->kwrgh", p, v, preferred_element_type=jnp.float32)
      return _online_step(carry, sc, valid[None, :, :, None, :], pv)

    n_chunks = (jnp.max(n_keys) + C - 1) // C
    _, l, acc = jax.lax.fori_loop(0, n_chunks, chunk, _init_carry(qb.shape[:4], H))
    dest = jnp.where(own, rows, Q + Bq)  # rows not owned: dropped
    return out.at[:, dest].set(_finish(l, acc), mode="drop")

  out = jnp.zeros((K, Q + Bq, G, H), jnp.float32)
  out = jax.lax.fori_loop(0, (total + W - 1) // W, wave, out)
  return out[:, :Q].transpose(1, 0, 2, 3).reshape(Q, N, H).astype(q.dtype)
