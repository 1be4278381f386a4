"""The language-model loss, kept as sums and counts.

Token cross-entropy comes back as (sum of token losses, number of counted tokens). A caller that
splits a batch (gradient accumulation, pipeline microbatches) adds the sums and divides once by the
step's token count: the mean of per-chunk means is biased whenever chunks hold different numbers of
target tokens (Megatron and MaxText normalise by the global token count the same way).

Shapes: the package legend in jaxllm/__init__.py (B, T, V).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
