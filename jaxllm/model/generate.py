"""A plain jitted generate loop over the contiguous KVCache: one XLA program, prefill then a lax.scan of
cached one-token steps, for a batch of equal-length prompts.

Why two generation paths: requests and the sample after training go through the serving engine
(jaxllm.serve: paged cache, scheduler, sampling parameters); this loop is the simple baseline it is
measured and checked against (`serve.py bench` and benchmarks/bench_engine.py: tokens/s, equal greedy tokens).

Shapes: the package legend in jaxllm/__init__.py (B, T = prompt length, left-aligned and equal per
batch, n new tokens, V).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.model.cache import KVCache
from jaxllm.model.params import ModelDef


def sample_token(logits, key, temperature: float):
  """logits [B, V] -> [B]; temperature 0 means greedy."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("mdef", "max_new", "temperature"))
def generate(mdef: ModelDef, params, prompt, max_new: int, temperature: float = 0.0, seed=0):
  """prompt [B, T] int32 -> new tokens [B, n] (n = max_new). Prefill once, then one cached step per token."""
  model = mdef.bind(params)
  B, T = prompt.shape
  cache = KVCache.init(mdef.cfg, B, T + max_new)
  out = model(prompt, cache=cache)
  key = jax.random.key(seed)
  first = sample_token(out.logits[:, -1], jax.random.fold_in(key, 0), temperature)

  def step(carry, i):
    tok, cache = carry
    o = model(tok[:, None], cache=cache)
    nxt = sample_token(o.logits[:, -1], jax.random.fold_in(key, i + 1), temperature)
    return (nxt, o.cache), tok

  (last, _), toks = jax.lax.scan(step, (first, out.cache), jnp.arange(max_new - 1))
  return jnp.concatenate([toks.T, last[:, None]], axis=1) if max_new > 1 else first[:, None]
