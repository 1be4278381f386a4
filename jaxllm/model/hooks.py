"""Seams where the parallel code plugs into the model without the model knowing about meshes.

The model calls `constrain(x, logical_names)` on key activations and `moe_experts(...)` for the
expert computation. Outside any `using(...)` block these are a no-op and the single-device dropless
dispatch; `jaxllm.parallel` installs mesh-aware versions (sharding constraints from the rules table,
expert-parallel dispatch from jaxllm.parallel.moe) while a step function is traced.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

_constrain: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("constrain", default=None)
_moe_experts: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("moe_experts", default=None)


def constrain(x, names: tuple[str | None, ...]):
  """Annotate activation `x` with logical axis names (e.g. ('batch', 'seq', 'embed'))."""
  fn = _constrain.get()
  return x if fn is None else fn(x, names)


def moe_experts_impl() -> Callable | None:
  """The installed expert-computation function, or None for the local default."""
  return _moe_experts.get()


@contextlib.contextmanager
def using(constrain: Callable | None = None, moe_experts: Callable | None = None):
  """Install hooks for the duration of a trace; None leaves the default in place."""
  tokens = []
  if constrain is not None:
    tokens.append((_constrain, _constrain.set(constrain)))
  if moe_experts is not None:
    tokens.append((_moe_experts, _moe_experts.set(moe_experts)))
  try:
    yield
  finally:
    for var, tok in reversed(tokens):
      var.reset(tok)


@contextlib.contextmanager
def cleared():
  """No hooks (e.g. inside a manually partitioned body, where global sharding constraints don't apply)."""
  t1, t2 = _constrain.set(None), _moe_experts.set(None)
  try:
    yield
  finally:
    _moe_experts.reset(t2)
    _constrain.reset(t1)
