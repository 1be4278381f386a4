"""Which manual mesh axes a value varies over, and marking it varying over more. Inside a region
partitioned by hand (jaxllm.parallel.manual, the pipeline; built there, never here) each array's type
records the axes over which it may differ per device, and a loop's carry must keep one type. Here,
below jaxllm.parallel, so that the model's flash attention and the parallel code share one definition;
outside such a region every array varies over no axis and both functions are no-ops.
"""

from __future__ import annotations

import jax


def varying_axes(*xs) -> frozenset:
  """The manual mesh axes any of xs may differ over per device (empty outside a hand-partitioned region)."""
  axes = set()
  for x in xs:
    axes |= set(getattr(getattr(jax.typeof(x), "mat", None), "varying", ()))
  return frozenset(axes)


def vary(tree, axes):
  """Every array of tree marked varying over axes (it may differ per device there), e.g. to give a scan
  carry the same type before and after its body. Axes an array already varies over are skipped (pcast
  rejects them)."""

  def one(x):
    missing = tuple(sorted(set(axes) - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(one, tree)
