"""Stateless building blocks of the decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Shapes: the package legend in jaxllm/__init__.py (B, T, S, D, N, K, G, H, F).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.kernels.reference import MASK_VALUE  # one finite "-inf" shared with the paged kernels
from jaxllm.model.hooks import constrain, sum_partials


def rms_norm(x, weight, eps: float):
  """HF convention: normalise in fp32, cast back, then scale."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * xf.astype(x.dtype)


@functools.lru_cache(maxsize=16)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """[H/2] inverse frequencies, fp32 as HF computes them, with optional llama3 scaling."""
  H = cfg.resolved_head_dim
  inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
  inv = inv.astype(np.float32)
  if cfg.rope_scaling == "llama3":
    # Llama 3.1 (HF _compute_llama3_parameters): keep high frequencies, divide low ones by
    # `factor`, interpolate smoothly in between.
    factor, lo, hi, old = (
      cfg.rope_factor,
      cfg.rope_low_freq_factor,
      cfg.rope_high_freq_factor,
      cfg.rope_original_max_pos,
    )
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def rope_tables(positions, inv_freq):
  """positions [B, T] -> cos, sin [B, T, H] in fp32 (rotate-half layout: both halves repeat)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B, T, n, H]; HF rotate_half convention."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * c + rotated * s


def attention(q, k, v, mask):
  """Grouped-query softmax attention.

  q [B, T, N, H]; k, v [B, S, K, H]; mask [B, T, S] bool (True = may attend) -> [B, T, N, H].
  Scores and softmax in fp32.
  """
  B, T, N, H = q.shape
  K = k.shape[2]
  q = q.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (H**-0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(B, T, N, H)


def project(x, w):
  """x [B, T, D] @ w [D, n, H] -> [B, T, n, H] (the q/k/v projections), as one 2-D matmul over the
  flattened tokens (see swiglu for why)."""
  D, n, H = w.shape
  return (x.reshape(-1, D) @ w.reshape(D, n * H)).reshape(*x.shape[:-1], n, H)


def project_out(a, w):
  """a [B, T, n, H] @ w [n, H, D] -> [B, T, D] (the output projection), one 2-D matmul."""
  n, H, D = w.shape
  return (a.reshape(-1, n * H) @ w.reshape(n * H, D)).reshape(*a.shape[:-2], D)


def swiglu(x, w_gate, w_up, w_down):
  """SwiGLU MLP (Shazeer 2020) in x's dtype. x [B, T, D]; w_gate, w_up [D, F]; w_down [F, D] -> [B, T, D].
  The hidden activation is annotated ('batch', 'seq', 'mlp') so tensor parallelism splits F; with F
  split by hand (manual TP) the down projection is a partial sum, which `sum_partials` completes."""
  dt = x.dtype
  # Plain 2-D matmuls over the flattened tokens [B*T, D]: with [B, T, D] operands the weight
  # gradients contract two axes (B and T), and XLA:CPU then transposes the [B, T, F] activation
  # gradients into copies before every weight-gradient dot (docs/benchmarks.md). The reshapes are
  # free (row-major).
  lead, F = x.shape[:-1], w_gate.shape[-1]
  x2 = x.reshape(-1, x.shape[-1])
  gate = constrain((x2 @ w_gate.astype(dt)).reshape(*lead, F), ("batch", "seq", "mlp"))
  hidden = jax.nn.silu(gate) * (x2 @ w_up.astype(dt)).reshape(*lead, F)
  return sum_partials((hidden.reshape(-1, F) @ w_down.astype(dt)).reshape(*lead, w_down.shape[-1]))
