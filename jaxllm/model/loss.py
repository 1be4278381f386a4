"""The language-model loss, kept as sums and counts.

Token cross-entropy comes back as (sum of token losses, number of counted tokens). A caller that
splits a batch (gradient accumulation, pipeline microbatches) adds the sums and divides once by the
step's token count: the mean of per-chunk means is biased whenever chunks hold different numbers of
target tokens (Megatron and MaxText normalise by the global token count the same way).

Shapes: the package legend in jaxllm/__init__.py (B, T, V).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.model.hooks import constrain


def token_nll(logits, targets):
  """logits [B, T, V] fp32, targets [B, T] int -> negative log-likelihood per token [B, T]."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - picked


def token_count(targets, mask=None):
  """Tokens that count in the loss (fp32 scalar): mask [B, T] (1 = counts), or every target."""
  if mask is None:
    return jnp.float32(targets.size)
  return jnp.sum(mask.astype(jnp.float32))


def cross_entropy_sums(logits, targets, mask=None):
  """-> (sum of token NLLs over the counted tokens, token_count); both fp32 scalars."""
  nll = token_nll(logits, targets)
  if mask is not None:
    nll = nll * mask.astype(nll.dtype)
  return jnp.sum(nll), token_count(targets, mask)


def cross_entropy(logits, targets, mask=None):
  """Mean token cross-entropy over the counted tokens (0 when none count)."""
  total, count = cross_entropy_sums(logits, targets, mask)
  return total / jnp.maximum(count, 1.0)


def _rows(x):  # [B, C, X] -> [B*C, X]: plain 2-D matmuls (one contracted axis; see layers.swiglu)
  return x.reshape(-1, x.shape[-1])


def _chunk_logits(hc, w):
  logits = jnp.dot(_rows(hc), w.astype(hc.dtype), preferred_element_type=jnp.float32)
  return constrain(logits.reshape(*hc.shape[:-1], w.shape[-1]), ("batch", "seq", "vocab"))


def _split(x, n):  # [B, n*C, ...] -> [n, B, C, ...]
  return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)


def _chunk_grads(hc, w, tc, mc):
  """One chunk: (masked NLL sum, d/dhc [B, C, D], d/dw [D, V] fp32), the logits [B, C, V] fp32 only
  inside. d nll / d logits = (softmax - onehot(target)) * mask."""
  hc = constrain(hc, ("batch", "seq", "embed"))
  logits = _chunk_logits(hc, w)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
  nll = jnp.sum((logz - picked) * mc)
  probs = jnp.exp(logits - logz[..., None])
  onehot = jnp.arange(logits.shape[-1], dtype=tc.dtype) == tc[..., None]
  # dlogits in the compute dtype for the two gradient matmuls (as fused cross-entropy kernels do):
  # autodiff of the plain loss keeps them fp32, which makes XLA upcast the head to an fp32 copy
  # (1 GB more temp for llama-3.2-1b) and run fp32 matmuls; in bf16 the two differ by bf16 rounding.
  dlogits = constrain((probs - onehot) * mc[..., None], ("batch", "seq", "vocab")).astype(hc.dtype)
  dh = jnp.dot(_rows(dlogits), w.astype(hc.dtype).T, preferred_element_type=jnp.float32).reshape(hc.shape)
  dw = jnp.dot(_rows(hc).T, _rows(dlogits), preferred_element_type=jnp.float32)
  return nll, dh.astype(hc.dtype), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_nll(h, w, targets, m, n):
  """Masked NLL sum of padded h [B, n*C, D] over n chunks; forward only (eval)."""

  def body(total, xs):
    hc, tc, mc = xs
    return total + jnp.sum(token_nll(_chunk_logits(constrain(hc, ("batch", "seq", "embed")), w), tc) * mc), None

  total, _ = jax.lax.scan(body, jnp.float32(0.0), (_split(h, n), _split(targets, n), _split(m, n)))
  return total


def _chunked_nll_fwd(h, w, targets, m, n):
  # Differentiated: each chunk's gradient is computed right after its loss, while its logits exist,
  # so no chunk's logits are kept or recomputed; the residuals are dh (h's size) and dw (w's size).
  def body(carry, xs):
    total, dw = carry
    nll, dh, dw_c = _chunk_grads(xs[0], w, xs[1], xs[2])
    return (total + nll, dw + dw_c), dh

  dw0 = jnp.zeros(w.shape, jnp.float32)
  (total, dw), dh = jax.lax.scan(body, (jnp.float32(0.0), dw0), (_split(h, n), _split(targets, n), _split(m, n)))
  dh = jnp.moveaxis(dh, 0, 1).reshape(h.shape)
  return total, (dh, dw.astype(w.dtype))


def _chunked_nll_bwd(n, res, g):
  dh, dw = res
  return (dh * g).astype(dh.dtype), (dw * g).astype(dw.dtype), None, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def chunked_cross_entropy_sums(h, w_head, targets, mask=None, chunk: int = 1024):
  """cross_entropy_sums(h @ w_head, targets, mask) without the [B, T, V] fp32 logits: a scan over
  chunks of `chunk` sequence positions (every row of the batch at once) computes one chunk's logits
  [B, chunk, V] and its NLL sum and, when differentiated (a custom_vjp), that chunk's gradients wrt h
  and w_head at once (softmax - onehot), so neither the forward nor the backward keeps or recomputes
  any chunk's logits: peak a few [B, chunk, V] fp32 buffers rather than [B, T, V] and its gradient, and
  the same 3 head matmuls per token as the plain loss. The chunk axis is the sequence, not the
  flattened [B*T] tokens, so rows stay where the batch is sharded (dp) and every chunk keeps every dp
  shard busy; a chunk's logits are constrained ("batch", "seq", "vocab") like the full ones (vocab over
  tp).

  h [B, T, D] (compute dtype), w_head [D, V] (any dtype: cast to h's per chunk; its gradient is summed
  over chunks in fp32), targets [B, T] int, mask [B, T] or None; chunk <= 0 or >= T: the plain loss.
  T not a multiple of `chunk` is padded with uncounted positions. -> (NLL sum, token_count), fp32.
  """
  B, T, D = h.shape
  if chunk <= 0 or T <= chunk:
    return cross_entropy_sums(_chunk_logits(h, w_head), targets, mask)
  count = token_count(targets, mask)
  n = -(-T // chunk)
  pad = n * chunk - T
  m = jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets, m = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(m, ((0, 0), (0, pad)))
  return _chunked_nll(h, w_head, targets, m, n), count
