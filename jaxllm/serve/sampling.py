"""Sampling: per-request parameters, the jitted batched sampler, and host-side stop checks.

Every request carries its own temperature / top-k / top-p / min-p and seed; the sampler works on a
batch of rows with per-row parameters so one compiled step serves any mix. The random key of a
request's n-th token is fold_in(PRNGKey(seed), n): the same seed gives the same tokens whatever
else is in the batch and however the request was scheduled or preempted.

Shapes: the package legend in jaxllm/__init__.py (R, V, n); a row is one sequence of the engine step.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
  max_tokens: int = 16              # generated tokens at most (stop tokens included)
  temperature: float = 0.0          # 0 = greedy (argmax)
  top_k: int = 0                    # keep the k most likely tokens; 0 = off
  top_p: float = 1.0                # nucleus: smallest set with cumulative prob >= top_p (Holtzman et al., 2020)
  min_p: float = 0.0                # drop tokens with prob < min_p * max prob (Nguyen et al., 2024)
  seed: int = 0
  stop_token_ids: tuple = ()        # finish when one of these is generated (it is kept in the output)
  stop: tuple = ()                  # finish when the detokenized output contains one of these strings
  logprobs: bool = False            # return the model's log-prob of each generated token

  def __post_init__(self):
    if self.max_tokens < 1:
      raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1:
      raise ValueError(f"bad sampling params {self}: need temperature >= 0, top_k >= 0, "
                       f"0 < top_p <= 1, 0 <= min_p <= 1")


def filter_logits(logits, top_k, top_p, min_p):
  """logits [R, V] fp32 (already temperature-scaled); per-row top_k [R] int (0 off), top_p [R],
  min_p [R] -> logits with removed tokens at -inf. The argmax token always survives."""
  V = logits.shape[-1]
  srt = jnp.sort(logits, axis=-1)[:, ::-1]                                 # [R, V] descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)               # [R, 1]
  keep = logits >= kth
  probs = jax.nn.softmax(srt, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs                              # mass strictly above each rank
  n_p = jnp.sum(before < top_p[:, None], axis=-1)                          # ranks needed to reach top_p
  n_p = jnp.where(top_p >= 1.0, V, n_p)                                    # fp cumsum may fall short of 1
  pth = jnp.take_along_axis(srt, (jnp.maximum(n_p, 1) - 1)[:, None], axis=-1)
  keep &= logits >= pth
  p_all = jax.nn.softmax(logits, axis=-1)
  keep &= p_all >= min_p[:, None] * jnp.max(p_all, axis=-1, keepdims=True)
  return jnp.where(keep, logits, -jnp.inf)


def sample(logits, temperature, top_k, top_p, min_p, seeds, counters):
  """logits [R, V] fp32 -> (tokens [R] int32, logprobs [R] fp32 under the unmodified model).

  temperature/top_p/min_p [R] fp32, top_k [R] int32, seeds/counters [R] uint32."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    filtered = filter_logits(scaled, top_k, top_p, min_p)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    drawn = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  # An all-greedy batch skips the sort/filter/draw at run time (cond runs one branch).
  tokens = jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
  return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def sampling_arrays(params_list, counters, S: int) -> dict:
  """Host numpy per-row parameter arrays [R], padded to R = S rows (padding rows are greedy). The
  parameter keeps its old name `S` for callers; it is the legend's R."""
  R, n = S, len(params_list)
  out = {"temperature": np.zeros(R, np.float32), "top_k": np.zeros(R, np.int32),
         "top_p": np.ones(R, np.float32), "min_p": np.zeros(R, np.float32),
         "seeds": np.zeros(R, np.uint32), "counters": np.zeros(R, np.uint32)}
  for i, sp in enumerate(params_list):
    out["temperature"][i], out["top_k"][i], out["top_p"][i] = sp.temperature, sp.top_k, sp.top_p
    out["min_p"][i], out["seeds"][i] = sp.min_p, sp.seed & 0xFFFFFFFF
  out["counters"][:n] = counters
  return out


def check_stop(sp: SamplingParams, output: list, detokenize=None) -> str | None:
  """Why a request with these generated tokens is finished ('stop' / 'length'), or None.
  Stop strings need a detokenizer (token ids -> text); the engine knows only ids."""
  if output and output[-1] in sp.stop_token_ids:
    return "stop"
  if sp.stop:
    if detokenize is None:
      raise ValueError("stop strings need a detokenizer: pass detokenize= to the Engine")
    text = detokenize(output)
    if any(s in text for s in sp.stop):
      return "stop"
  if len(output) >= sp.max_tokens:
    return "length"
  return None
