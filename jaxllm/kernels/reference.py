"""Pure-jnp paged attention: the definition the Pallas kernels are tested against, and the CPU path.

The KV cache lives in fixed-size pages (vLLM's PagedAttention, SOSP'23); a sequence's keys are the
pages its page-table row names, in order. Page 0 is the null page: the engine never gives it to a live
sequence and pads page tables with it, so nothing here may let its contents (or any slot past a
sequence's length) reach the output -- the tests fill all of those with NaN.

Shapes: the package legend in jaxllm/__init__.py (R, Q, N, K, G, H, P, Z, M); a sequence holds at
most M * Z keys.

  paged_decode_attention(q [R, N, H], k_pages [P, Z, K, H], v_pages [P, Z, K, H],
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
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import numpy as np

# Finite "minus infinity" for masked scores: a row with every key masked (padding) gives a uniform
# softmax instead of NaN. The model's dense attention uses the same value.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def gather_pages(pages, page_table):
  """pages [P, Z, K, H], page_table [R, M] -> contiguous [R, M * Z, K, H]."""
  R, M = page_table.shape
  _, Z, K, H = pages.shape
  return pages[page_table].reshape(R, M * Z, K, H)


def _attend(q, k, v, valid, kv_valid):
  """q [rows, K, G, H] against one sequence's keys k, v [keys, K, H]; valid [rows, keys]; kv_valid [keys]
  -> fp32 [rows, K, G, H] (keys = M * Z, the sequence's key capacity).

  Invalid keys get zero probability, and keys past the sequence's length a zeroed value too (their
  slots may hold anything, and 0 * NaN is still NaN); a row with no valid key gets 0, not a uniform
  average.
  """
  H = q.shape[-1]
  s = jnp.einsum("rkgh,ckh->rkgc", q, k, preferred_element_type=jnp.float32) * (H ** -0.5)
  m = valid[:, None, None, :]
  s = jnp.where(m, s, MASK_VALUE)
  p = jnp.where(m, jnp.exp(s - s.max(axis=-1, keepdims=True)), 0.0)
  l = p.sum(axis=-1, keepdims=True)
  v = jnp.where(kv_valid[:, None, None], v, jnp.zeros((), v.dtype)).astype(jnp.float32)
  o = jnp.einsum("rkgc,ckh->rkgh", p, v, preferred_element_type=jnp.float32)
  return o / jnp.where(l == 0.0, 1.0, l)


@jax.jit
def paged_decode_attention(q, k_pages, v_pages, kv_lens, page_table):
  """q [R, N, H] -> [R, N, H]; see the module docstring."""
  R, N, H = q.shape
  K = k_pages.shape[2]
  k = gather_pages(k_pages, page_table)                       # [R, M * Z, K, H]
  v = gather_pages(v_pages, page_table)
  kv_valid = jnp.arange(k.shape[1])[None, :] < kv_lens[:, None]  # [R, M * Z]
  o = jax.vmap(_attend)(q.reshape(R, 1, K, N // K, H), k, v, kv_valid[:, None, :], kv_valid)
  return o.reshape(R, N, H).astype(q.dtype)


def query_block_size(Q: int) -> int:
  """Rows per query block of the ragged attention: 64, or Q itself when smaller."""
  return max(1, min(Q, 64))


@jax.jit
def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs):
  """q [Q, N, H] -> [Q, N, H]; see the module docstring.

  Works per query block: each live sequence's rows are cut into blocks of `query_block_size(Q)` rows
  (a sequence's last block is partial), and one loop iteration attends one block to its own
  sequence's keys [M * Z, K, H]. The trip count is dynamic (sum over live sequences of
  ceil(q_len / block)), so the work is O((Q + num_seqs * block) * M * Z): it grows with the tokens of
  the step, not with tokens x sequences (a loop over sequences scoring all Q rows each time would),
  and padding costs nothing.
  """
  Q, N, H = q.shape
  K, n_keys = k_pages.shape[2], page_table.shape[1] * k_pages.shape[1]   # n_keys = M * Z
  Bq = query_block_size(Q)
  R = kv_lens.shape[0]
  live = jnp.arange(R) < num_seqs
  q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)                # [R]
  n_blocks = (q_lens + Bq - 1) // Bq                                         # [R]
  first_block = jnp.cumsum(n_blocks) - n_blocks                              # [R] exclusive cumsum
  # Q + Bq rows, so a block's dynamic slice never runs off the end (which would shift it).
  qg = jnp.pad(q.reshape(Q, K, N // K, H), ((0, Bq), (0, 0), (0, 0), (0, 0)))
  kpos, offs = jnp.arange(n_keys), jnp.arange(Bq)

  def one_block(b, out):
    s = jnp.searchsorted(first_block + n_blocks, b, side="right")            # the block's sequence
    start = cu_q_lens[s] + (b - first_block[s]) * Bq                         # its first query row
    end, kv_len = cu_q_lens[s + 1], kv_lens[s]
    k = k_pages[page_table[s]].reshape(n_keys, K, H)
    v = v_pages[page_table[s]].reshape(n_keys, K, H)
    rows = start + offs                                                      # [Bq]
    own = rows < end
    qpos = kv_len - (end - cu_q_lens[s]) + (rows - cu_q_lens[s])             # [Bq] positions in the sequence
    kv_valid = kpos < kv_len
    valid = own[:, None] & (kpos[None, :] <= qpos[:, None]) & kv_valid[None, :]
    blk = _attend(jax.lax.dynamic_slice_in_dim(qg, start, Bq), k, v, valid, kv_valid)
    old = jax.lax.dynamic_slice_in_dim(out, start, Bq)
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(own[:, None, None, None], blk, old), start, 0)

  out = jax.lax.fori_loop(0, jnp.sum(n_blocks), one_block, jnp.zeros((Q + Bq, K, N // K, H), jnp.float32))
  return out[:Q].reshape(Q, N, H).astype(q.dtype)
