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


@jax.jit
def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs):
  """q [Q, N, H] -> [Q, N, H]; see the module docstring.

  Loops over the live sequences (a dynamic trip count, so padding sequences cost nothing); each
  iteration gathers one sequence's keys [M * Z, K, H] and scores all Q rows against them, keeping the
  rows that sequence owns. O(num_seqs * Q * M * Z) work: clear rather than fast, which is what a
  reference is for.
  """
  Q, N, H = q.shape
  K, n_keys = k_pages.shape[2], page_table.shape[1] * k_pages.shape[1]   # n_keys = M * Z
  qg = q.reshape(Q, K, N // K, H)
  rows, kpos = jnp.arange(Q), jnp.arange(n_keys)

  def one_seq(s, out):
    start, end, kv_len = cu_q_lens[s], cu_q_lens[s + 1], kv_lens[s]
    k = k_pages[page_table[s]].reshape(n_keys, K, H)
    v = v_pages[page_table[s]].reshape(n_keys, K, H)
    own = (rows >= start) & (rows < end)                       # [Q]
    qpos = kv_len - (end - start) + (rows - start)             # [Q] each row's position in its seq
    kv_valid = kpos < kv_len                                   # [M * Z]
    valid = own[:, None] & (kpos[None, :] <= qpos[:, None]) & kv_valid[None, :]  # [Q, M * Z]
    return jnp.where(own[:, None, None, None], _attend(qg, k, v, valid, kv_valid), out)

  out = jax.lax.fori_loop(0, num_seqs, one_seq, jnp.zeros((Q, K, N // K, H), jnp.float32))
  return out.reshape(Q, N, H).astype(q.dtype)
