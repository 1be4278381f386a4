"""Batch-invariant arithmetic (ModelConfig.batch_invariant): every row of a forward pass computed with
the same sequence of floating-point operations whatever else is in the batch, so the serving engine
(any batch, prefill chunk, prefix-cache hit, overlap, preemption) and the trainer's forward give one
token the same bits. Thinking Machines' "Defeating nondeterminism in LLM inference" (2025) and
SGLang's deterministic inference do this with kernels of fixed tile shapes; here it is XLA on the same
principle:

  - A fused XLA computation is not batch invariant: its loops are tiled and vectorised by shape, so a
    matmul (split points of the reduction), an RMSNorm's reduce or even cos/sin (vector lanes vs the
    scalar tail) give a row other bits when the row count or the row's position changes.
  - Row-wise work runs in `tiled`: a loop over fixed tiles of TILE rows, each tile one call of the
    same loop body. XLA compiles the body on its own, for its fixed shape, so every row goes through
    the same code in every program (the engine's steps, the learner's forward) and at any offset;
    `tiled` says what keeps XLA from simplifying the loop away (forward passes only, as a result).
  - RoPE's cos/sin are gathered from a table computed once on the host (no transcendental function
    on the row path).
  - Attention (`block_attention`) walks each query's keys in fixed blocks of BLOCK keys at absolute
    positions, in order, with an online softmax (FlashAttention's recurrence): the blocks a query sees
    are the same in a paged cache (pages split into BLOCK-key blocks) as in a training row, and the
    blocks past its position are exact no-ops (probabilities exp(MASK - m) = 0, scale exp(0) = 1), so
    the page-table width or sequence length does not matter either (and a tile stops at the block
    of its furthest query).
  - On a mesh, jaxllm.parallel.invariant_tp runs these functions per device.

Measured on this stack (docs/serving.md): outside `tiled`, a 64-row matmul gives rows 2..32 other
bits than the same rows computed alone; inside it, every row count from 1 to 63 gives the same bits.
Shapes: the package legend in jaxllm/__init__.py (N = rows, D, N_heads as N in q, K, G, H, V, M).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.reference import MASK_VALUE
from jaxllm.model import layers as ops

TILE = 8  # rows per tile (a tile of 1 is not invariant here: XLA compiles single rows differently)
BLOCK = 16  # keys per attention block; a paged cache's page_size must be a multiple


def tiled(fn, *xs, rows: int = TILE):
  """fn(*tiles) applied to fixed tiles of `rows` (TILE) rows of xs (arrays or pytrees with a leading
  row dim N, the same for all) -> fn's outputs concatenated over rows [N, ...]. Rows are padded to a
  multiple of `rows` with zeros (fn must keep rows independent; the padding rows are dropped).

  The tiles run in a loop XLA must keep as a loop whose body it compiles on its own, the same in
  every program. Two simplifications would break that, and each was measured to change bits:
    - a loop of one known trip is inlined, its body fused with its neighbours: so the trip count
      is `opaque`;
    - a slice or update that covers a whole array is folded away, and the tile's code is fused
      differently (RoPE's multiply-add, fused into the output write or not): so the inputs and the
      output buffer hold one tile more than the loop visits.
  The loop's trip count is not static, so this is a forward pass only (no reverse-mode gradient)."""
  n = jax.tree.leaves(xs)[0].shape[0]
  k = -(-n // rows)  # tiles the loop visits

  def split(x):  # [N, ...] -> [k + 1, rows, ...], zero-padded
    x = jnp.pad(x, ((0, (k + 1) * rows - n),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape(k + 1, rows, *x.shape[1:])

  tiles = jax.tree.map(split, xs)
  shapes = jax.eval_shape(lambda t: fn(*t), jax.tree.map(lambda x: x[0], tiles))
  out = jax.tree.map(lambda s: jnp.zeros((k + 1, *s.shape), s.dtype), shapes)

  def body(i, out):
    o = fn(*jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tiles))
    return jax.tree.map(lambda b, y: jax.lax.dynamic_update_index_in_dim(b, y, i, 0), out, o)

  out = jax.lax.fori_loop(0, opaque(k), body, out)
  return jax.tree.map(lambda o: o.reshape((k + 1) * rows, *o.shape[2:])[:n], out)


def opaque(n):
  """n (an int or a traced int) as an int32 that XLA cannot see through: a loop bound it must keep."""
  return jax.lax.optimization_barrier(jnp.asarray(n, jnp.int32))


@functools.lru_cache(maxsize=16)
def _rope_table(inv_freq: tuple, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  freqs = np.arange(max_len, dtype=np.float32)[:, None] * np.asarray(inv_freq, np.float32)[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)
  return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rope_tables(positions, inv_freq, max_len: int):
  """positions [...] -> cos, sin [..., H] fp32, gathered from tables of max_len positions."""
  cos, sin = _rope_table(tuple(np.asarray(inv_freq).tolist()), int(max_len))
  p = jnp.clip(positions, 0, max_len - 1)
  return jnp.asarray(cos)[p], jnp.asarray(sin)[p]


def block_attention(q, positions, page_table, k_pages, v_pages):
  """Causal attention of each query row over its own keys, in fixed blocks (module doc).

  q [N, N_heads, H]; positions [N] int32 (a query sees keys at positions <= its own; < 0: none);
  page_table [N, M] int32: the blocks holding the row's keys 0..BLOCK*M-1 in order; k_pages, v_pages
  [K, P, BLOCK, H]. -> [N, N_heads, H] in q's dtype. Scores and softmax in fp32."""
  Nh, H = q.shape[1], q.shape[2]
  K, M = k_pages.shape[0], page_table.shape[1]  # M before the padding column below
  G = Nh // K
  scale = H**-0.5

  def tile(qt, pt, tt):  # qt [t, Nh, H], pt [t], tt [t, M]
    qg = qt.reshape(qt.shape[0], K, G, H)

    def block(carry, j):
      m, den, acc = carry
      kb = k_pages[:, tt[:, j]]  # [K, t, BLOCK, H]
      vb = v_pages[:, tt[:, j]]
      s = jnp.einsum("tkgh,ktzh->tkgz", qg, kb, preferred_element_type=jnp.float32) * scale
      seen = (j * BLOCK + jnp.arange(BLOCK))[None, :] <= pt[:, None]  # [t, BLOCK]
      s = jnp.where(seen[:, None, None, :], s, MASK_VALUE)
      m_new = jnp.maximum(m, s.max(-1))
      alpha, p = jnp.exp(m - m_new), jnp.exp(s - m_new[..., None])
      acc = acc * alpha[..., None] + jnp.einsum("tkgz,ktzh->tkgh", p, vb.astype(jnp.float32))
      return (m_new, den * alpha + p.sum(-1), acc), None

    t = qt.shape[0]
    init = (
      jnp.full((t, K, G), MASK_VALUE, jnp.float32),
      jnp.zeros((t, K, G), jnp.float32),
      jnp.zeros((t, K, G, H), jnp.float32),
    )
    # Only the blocks up to the tile's furthest query: the rest are exact no-ops for every row in it,
    # so a short context does not pay for the page table's width (at least one block: padding rows
    # with no keys stay finite).
    n = opaque(jnp.clip(jnp.max(pt) // BLOCK + 1, 1, M))
    _, den, acc = jax.lax.fori_loop(0, n, lambda j, c: block(c, j)[0], init)
    return (acc / den[..., None]).reshape(t, Nh, H).astype(qt.dtype)

  # A null column, so that a block index never reads a whole array (see `tiled`); never reached.
  return tiled(tile, q, positions, jnp.pad(page_table, ((0, 0), (0, 1))))


def sequence_attention(q, k, v):
  """Causal self-attention of whole rows through block_attention: q [B, T, N_heads, H]; k, v
  [B, T, K, H] -> [B, T, N_heads, H]. The keys are laid out as BLOCK-key blocks (T padded to a
  multiple of BLOCK), so a row's query sees the blocks the engine's paged cache gives it."""
  B, T, Nh, H = q.shape
  K = k.shape[2]
  Tp = -(-T // BLOCK) * BLOCK
  M = Tp // BLOCK

  def blocks(x):  # [B, T, K, H] -> [K, B*M, BLOCK, H]
    x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    return x.reshape(B * M, BLOCK, K, H).transpose(2, 0, 1, 3)

  table = jnp.arange(B * M, dtype=jnp.int32).reshape(B, 1, M)
  table = jnp.broadcast_to(table, (B, T, M)).reshape(B * T, M)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)).reshape(B * T)
  out = block_attention(q.reshape(B * T, Nh, H), positions, table, blocks(k), blocks(v))
  return out.reshape(B, T, Nh, H)


def rms_norm(x, w, eps: float):
  """RMSNorm of x [N, D] with weight w [D], tile by tile (the model's final norm in this mode)."""
  return tiled(lambda r: ops.rms_norm(r, w, eps), x)


def logits(h, w, gather=None):
  """h [N, D] @ w [D, V] -> fp32 logits [N, V], tile by tile. gather: applied to each tile's logits
  (on a mesh, the all-gather of a vocab-split head's [TILE, V/tp] tiles)."""

  def tile(a):
    out = jnp.dot(a, w.astype(a.dtype), preferred_element_type=jnp.float32)
    return out if gather is None else gather(out)

  return tiled(tile, h)


def row_logprobs(x, tokens):
  """x [t, V] fp32 (logits, already divided by a temperature), tokens [t] -> log softmax(x)[token] [t]:
  the one function the engine's reported log-probs (inside its sampler's tiles) and the learner's
  (token_logprobs) share."""
  return jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(x, axis=-1)


def token_logprobs(x, tokens):
  """row_logprobs of x [N, V] and tokens [N], tile by tile -> [N]."""
  return tiled(row_logprobs, x, tokens)


HEAD_CHUNK = 256  # rows of [rows, V] logits the learner's log-prob pass holds at a time


def head_logprobs(h, w, tokens, temperature, gather=None):
  """log softmax(h @ w / temperature)[token] -> [N] for h [N, D], tokens [N], a scalar temperature,
  HEAD_CHUNK rows at a time (`logits`, `temperature_scale`, `token_logprobs` on each chunk): the
  learner's passes over thousands of rows never hold [N, V] logits. Each step keeps its own tiled loop,
  as in the engine; the three fused in one tile body measured other bits than the engine's."""

  def chunk(hc, yc):
    return token_logprobs(temperature_scale(logits(hc, w, gather), temperature), yc)

  return tiled(chunk, h, tokens, rows=HEAD_CHUNK)


def temperature_scale(x, temperature):
  """x [N, V] / max(temperature, 1e-6) per row (temperature [N] or a scalar), as the sampler scales."""
  t = jnp.maximum(jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), x.shape[:1]), 1e-6)
  return x / t[:, None]
