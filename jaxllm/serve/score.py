"""Prompt log-probs: the model's log-prob of every prompt token given the tokens before it (what
lm-eval's loglikelihood tasks read through `echo` + `logprobs` + `max_tokens=0`, and SGLang's
`input_token_logprobs`), with the most likely alternatives at each position.

Computed by a plain full forward of the model over the prompts, outside the paged step functions:
  - exact and independent of serving: the paged prefill computes a prompt in chunks, skips the part
    the radix cache already holds and keeps only each sequence's last row of logits, so prompt
    log-probs from it would depend on what else was cached, and the shared step functions (their
    compile shapes, their outputs) would change for every request;
  - few shapes: the prompts are padded to [B, T] with B and T powers of two (padding rows and
    positions come after the real tokens, which causal attention never lets them touch), at most
    MAX_PROMPTS prompts and MAX_TOKENS padded tokens per forward (`groups`);
  - no [B, T, V] fp32 logits: the head runs over chunks of model.loss_chunk positions (a lax.map,
    as the RL learner's token log-probs), each chunk keeping only the prompt token's log-prob and
    the top alternatives.
The forward runs on the engine thread (EngineService.score), between two steps, so the weights it
reads are the engine's current ones and their version is reported with the result; a set_weights
cannot swap them halfway. A new shape is compiled by the calling thread first (`prepare`), so the
engine thread, which every stream waits on, only runs compiled code. On a mesh it runs under the
engine's mesh and hooks, with B a multiple of the engine's rows (dp), as the step functions do.
The cost: a prompt that is also generated from is computed twice (here and by the prefill).

Shapes: the package legend in jaxllm/__init__.py (B, T, D, V); 20 is TOP_LOGPROBS.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.buckets import pow2_bucket
from jaxllm.model import hooks
from jaxllm.parallel import mesh_hooks
from jaxllm.serve.sampling import TOP_LOGPROBS

MIN_LEN = 16  # the smallest padded prompt length (a few buckets cover short prompts)
MAX_PROMPTS = 8  # prompts per forward at most
MAX_TOKENS = 16384  # padded B * T per forward at most (a longer prompt goes alone)


@dataclass
class PromptScore:
  """One prompt's log-probs. Position 0 has none (nothing precedes it): None there, as OpenAI and
  vLLM report it."""

  token_ids: list  # the prompt
  logprobs: list  # [None, log p(t1 | t0), log p(t2 | t0 t1), ...]
  top: list  # per position [(id, logprob)] of the `top` likeliest (None at 0); [] when top == 0
  weight_version: object  # the weights that computed them


class Scorer:
  """Prompt log-probs with `engine`'s model, weights and mesh. `score` on the engine thread (between
  steps); `prepare` from any thread."""

  def __init__(self, engine):
    self.engine = engine
    self.rows = max(1, engine.rows)
    self._compiled: dict = {}  # (B, T, with_top) -> compiled forward
    self._lock = threading.Lock()
    self.compiles = 0
    mdef, chunk = engine.mdef, engine.cfg.loss_chunk

    def forward(params, tokens, with_top: bool):
      """tokens [B, T] -> log-prob of tokens[:, t + 1] at each t [B, T] fp32 (the last is junk), and
      the top-20 ids [B, T, 20] and log-probs of each position's next-token distribution."""
      model = mdef.bind(params)
      h, _, _ = model.hidden(tokens)  # [B, T, D]
      B, T, _ = h.shape
      targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # the next token at each t
      C = T if chunk <= 0 or chunk >= T else chunk
      n = -(-T // C)

      def one(xs):
        hc, tc = xs
        logits = model.logits(hc)  # [B, C, V] fp32
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - lse
        if not with_top:
          return lp, jnp.zeros(lp.shape + (0,), jnp.int32), jnp.zeros(lp.shape + (0,), jnp.float32)
        k = min(TOP_LOGPROBS, logits.shape[-1])
        vals, ids = jax.lax.top_k(logits, k)
        return lp, ids.astype(jnp.int32), vals - lse[..., None]

      out = jax.lax.map(one, (_chunks(h, n, C), _chunks(targets, n, C)))  # each [n, B, C, ...]
      return tuple(jnp.moveaxis(x, 0, 1).reshape((B, n * C) + x.shape[3:])[:, :T] for x in out)

    self._jit = jax.jit(forward, static_argnums=(2,))

  def shape(self, prompts) -> tuple[int, int]:
    """The padded [B, T] of a batch of prompts."""
    return pow2_bucket(len(prompts), self.rows), pow2_bucket(max(map(len, prompts)), MIN_LEN)

  @contextlib.contextmanager
  def _context(self):
    """The engine's mesh and model hooks, as Engine._run sets them."""
    eng = self.engine
    if eng.mesh is None:
      yield
      return
    with jax.set_mesh(eng.mesh), hooks.using(**mesh_hooks(eng.mesh, eng.plan, eng.cfg)):
      yield

  def prepare(self, prompts, top: int) -> None:
    """Compile the forward for this batch's shape if it is new (any thread; the engine thread then
    only runs it)."""
    self._get(*self.shape(prompts), top > 0)

  def groups(self, prompts) -> list[list]:
    """The prompts in order, cut into the batches of one forward each (MAX_PROMPTS, MAX_TOKENS)."""
    out, group = [], []
    for p in prompts:
      grown = group + [p]
      B, T = self.shape(grown)
      if group and (len(grown) > MAX_PROMPTS or B * T > MAX_TOKENS):
        out.append(group)
        grown = [p]
      group = grown
    return out + [group] if group else out

  def _get(self, B: int, T: int, with_top: bool):
    key = (B, T, with_top)
    fn = self._compiled.get(key)
    if fn is None:
      with self._lock:  # one compile per shape, by whichever thread asks first
        fn = self._compiled.get(key)
        if fn is None:
          with self._context():
            spec = jax.ShapeDtypeStruct((B, T), jnp.int32)
            fn = self._compiled[key] = self._jit.lower(self.engine.params, spec, with_top).compile()
          self.compiles += 1
    return fn

  def score(self, prompts, top: int = 0) -> list[PromptScore]:
    """Log-probs of each prompt (lists of token ids, each non-empty) with `top` (0..20)
    alternatives per position, under the engine's current weights."""
    if not 0 <= top <= TOP_LOGPROBS:
      raise ValueError(f"top={top} must be in 0..{TOP_LOGPROBS}")
    B, T = self.shape(prompts)
    tokens = np.zeros((B, T), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
    params, version = self.engine.params, self.engine.weight_version  # one engine-thread read
    fn = self._get(B, T, top > 0)
    with self._context():
      try:
        out = fn(params, tokens)
      except (TypeError, ValueError):  # swapped-in weights of another dtype or sharding: trace for them
        out = self._jit(params, tokens, top > 0)
    lp, ids, lps = map(np.asarray, out)
    out = []
    for i, p in enumerate(prompts):
      n = len(p)
      logprobs = [None] + lp[i, : n - 1].tolist()
      alts = []
      if top:
        alts = [None] + [list(zip(ids[i, t, :top].tolist(), lps[i, t, :top].tolist())) for t in range(n - 1)]
      out.append(PromptScore(list(p), logprobs, alts, version))
    return out


def _chunks(x, n: int, C: int):
  """[B, T, ...] -> [n, B, C, ...], T padded to n * C."""
  B, T = x.shape[:2]
  x = jnp.pad(x, ((0, 0), (0, n * C - T)) + ((0, 0),) * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((B, n, C) + x.shape[2:]), 1, 0)
