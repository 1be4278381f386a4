"""Seams where the parallel code plugs into the model without the model knowing about meshes.

The model calls `constrain(x, logical_names)` on key activations, `moe_experts(...)` for the expert
computation, `sum_partials(x)` on projections that contract a dim tensor parallelism may split
(attention heads, MLP hidden) and `batch_mean(x)` on statistics averaged over the batch (MoE router).
Outside any `using(...)` block `constrain`, `sum_partials` and `batch_mean` are identities and the
experts take the single-device dropless dispatch. `jaxllm.parallel` installs mesh-aware versions:
sharding constraints and the expert-parallel dispatch for the auto-sharded jit (`mesh_hooks`), or the
per-device versions for code partitioned by hand (jaxllm.parallel.manual says which collectives).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

_constrain: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("constrain", default=None)
_moe_experts: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("moe_experts", default=None)
_sum_partials: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("sum_partials", default=None)
_batch_mean: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("batch_mean", default=None)
_ALL = (_constrain, _moe_experts, _sum_partials, _batch_mean)


def constrain(x, names: tuple[str | None, ...]):
  """Annotate activation `x` with logical axis names (e.g. ('batch', 'seq', 'embed'))."""
  fn = _constrain.get()
  return x if fn is None else fn(x, names)


def moe_experts_impl() -> Callable | None:
  """The installed expert-computation function, or None for the local default."""
  return _moe_experts.get()


def sum_partials(x):
  """`x` is a partial sum because the contracted dim (heads, MLP hidden) is split over devices:
  return the full sum. Identity unless jaxllm.parallel.manual installs the reduction."""
  fn = _sum_partials.get()
  return x if fn is None else fn(x)


def batch_mean(x):
  """`x` is a mean over this device's tokens: return the mean over the whole batch. Identity unless
  jaxllm.parallel.manual installs the average over data shards (exact: equal token counts per shard)."""
  fn = _batch_mean.get()
  return x if fn is None else fn(x)


@contextlib.contextmanager
def using(
  constrain: Callable | None = None,
  moe_experts: Callable | None = None,
  sum_partials: Callable | None = None,
  batch_mean: Callable | None = None,
):
  """Install hooks for the duration of a trace; None leaves the default in place."""
  tokens = []
  for var, fn in zip(_ALL, (constrain, moe_experts, sum_partials, batch_mean)):
    if fn is not None:
      tokens.append((var, var.set(fn)))
  try:
    yield
  finally:
    for var, tok in reversed(tokens):
      var.reset(tok)


@contextlib.contextmanager
def cleared():
  """No hooks (e.g. inside a manually partitioned body, where global sharding constraints don't apply)."""
  tokens = [(var, var.set(None)) for var in _ALL]
  try:
    yield
  finally:
    for var, tok in reversed(tokens):
      var.reset(tok)
