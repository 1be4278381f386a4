"""The structured-output rows of one engine (SamplingParams.grammar; jaxllm.serve.grammar): the
grammar compiler of its tokenizer, built at first use; a matcher per unfinished request with a
grammar; and each step's `grammar_mask` [R, ceil(V/32)]. The engine asks for the masks before a
launch and feeds the committed tokens back after it (its `_collect`); the masks of the next step are
computed then, on the host, while the device runs (jaxllm.serve.engine, the split decode).

Shapes: the package legend in jaxllm/__init__.py (R, V).
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.serve.grammar import GrammarCompiler
from jaxllm.serve.sampling import unconstrained_mask


class GrammarRows:
  def __init__(self, tokenizer, vocab_size: int, mesh=None):
    self.tokenizer, self.vocab_size, self.mesh = tokenizer, vocab_size, mesh
    self._compiler: GrammarCompiler | None = None
    self._lock = threading.Lock()  # requests are checked (and their grammars compiled) on other threads
    self.matchers: dict = {}  # Req -> grammar.Matcher of each unfinished structured-output request
    self._open: dict = {}  # R -> the all-ones grammar_mask on device (batches without a grammar)

  @property
  def compiler(self) -> GrammarCompiler:
    """The grammars of the engine's tokenizer (built on first use)."""
    with self._lock:
      if self._compiler is None:
        if self.tokenizer is None:
          raise ValueError("structured output (a grammar) needs the tokenizer: pass tokenizer= to the Engine")
        self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
    return self._compiler

  def start(self, req) -> None:
    """Follow req's grammar from its first token."""
    self.matchers[req] = self.compiler.matcher(req.sp.grammar, req.sp.stop_token_ids)

  def drop(self, req) -> None:
    self.matchers.pop(req, None)

  def __bool__(self) -> bool:
    return bool(self.matchers)

  def structured(self, batch) -> bool:
    """Whether any row of batch [(req, n)] has a grammar."""
    return bool(self.matchers) and any(r in self.matchers for r, _ in batch)

  def masks(self, batch, R: int):
    """The step's `grammar_mask` [R, ceil(V/32)]: each grammar row's next-token bitmask (computed
    after its last commit, see `advance`), all ones for the rest. A batch without a grammar row reuses
    one all-ones array per R kept on device: nothing is built or uploaded per step."""
    if not self.structured(batch):
      if R not in self._open:
        ones = unconstrained_mask(R, self.vocab_size)
        sh = NamedSharding(self.mesh, P()) if self.mesh is not None else None
        self._open[R] = jax.device_put(ones, sh) if sh is not None else jnp.asarray(ones)
      return self._open[R]
    masks = unconstrained_mask(R, self.vocab_size)
    rows = [(i, self.matchers[r]) for i, (r, _) in enumerate(batch) if r in self.matchers]
    self.compiler.fill([m for _, m in rows if m.mask is None])  # new requests: their first mask
    for i, m in rows:
      masks[i] = m.mask
    return masks

  def advance(self, batch, done: list, finish) -> list:
    """Feed each grammar row's new tokens to its matcher (a stop token ends the output instead);
    finish ("stop", through `finish(req)`) the requests whose grammar is complete, and fill the next
    masks of the rest now, so the next launch has them. Returns the requests finished here (`done`:
    those the commit finished)."""
    finished, live = [], []
    for r, _ in batch:
      m = self.matchers.get(r)
      if m is None:
        continue
      new = r.output[m.consumed :]
      if new and r in done and new[-1] in r.sp.stop_token_ids:
        new = new[:-1]  # the stop token closes the output; it is not part of the grammar's text
      ok = m.consume(new) if new else True
      if r.finish_reason is None and (not ok or m.done):
        r.finish_reason = "stop" if ok else "error"  # "error": a token the mask ruled out (a bug)
        finish(r)
        finished.append(r)
      if r.finish_reason is None:
        live.append(m)
      else:
        del self.matchers[r]
    self.compiler.fill([m for m in live if m.mask is None])
    return finished
