"""Per-device shapes and bytes of parameters and optimizer state from the trainer's own placement
rules (jaxllm.parallel.sharding.param_specs), without devices."""

from __future__ import annotations

import math


def axis_sizes(plan) -> dict[str, int]:
  return dict(zip(plan.axis_names, plan.axis_sizes))


def _entry_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape, spec, sizes: dict[str, int]) -> tuple[int, ...]:
  """One device's shard of an array of `shape` under PartitionSpec `spec` (ceil division per dim)."""
  spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  return tuple(-(-d // math.prod(sizes[a] for a in _entry_axes(e))) for d, e in zip(shape, spec))


def nbytes(shape, dtype) -> int:
  import numpy as np

  return int(math.prod(shape)) * np.dtype(dtype).itemsize


def _is_spec(x) -> bool:
  from jax.sharding import PartitionSpec

  return isinstance(x, PartitionSpec)


def state_bytes(mdef, tx, plan) -> tuple[int, int]:
  """(parameter bytes, optimizer-state bytes) per device. Placement: `param_specs` (on the canonical
  [L, ...] shapes: the layer dim split over pp holds the same bytes per device as the pipeline layout
  [vpp, pp, C, ...] the train state keeps); optimizer moments follow their parameter, the rest is
  replicated (as jaxllm.parallel.sharding.opt_state_shardings places them)."""
  import jax
  import optax
  from jax.sharding import PartitionSpec as P

  from jaxllm.parallel.sharding import param_specs

  sizes = axis_sizes(plan)
  abstract = mdef.abstract_params()
  specs = param_specs(mdef, plan)
  per = lambda a, s: nbytes(shard_shape(a.shape, s, sizes), a.dtype)
  params = sum(jax.tree.leaves(jax.tree.map(per, abstract, specs, is_leaf=_is_spec)))
  opt_abstract = jax.eval_shape(tx.init, abstract)
  opt_specs = optax.tree_map_params(
    tx, lambda _, s: s, opt_abstract, specs, transform_non_params=lambda _: P(), is_leaf=_is_spec
  )
  opt = sum(jax.tree.leaves(jax.tree.map(per, opt_abstract, opt_specs, is_leaf=_is_spec)))
  return params, opt


def compute_shapes(mdef, plan) -> dict:
  """Per-device shapes of the weights as the computation uses them: split over the model-parallel
  axes param_specs gives them (tp, ep, etp), gathered over any axes sharding the `embed` dim (fsdp)
  and without the stacked layer dim's pp split (one layer at a time)."""
  import jax

  from jaxllm.parallel.sharding import param_specs

  sizes = axis_sizes(plan)

  def one(names, a, spec):
    spec = tuple(spec) + (None,) * (len(a.shape) - len(tuple(spec)))
    keep = [None if n in ("embed", "layers") else e for n, e in zip(names, spec)]
    return jax.ShapeDtypeStruct(shard_shape(a.shape, keep, sizes), a.dtype)

  return jax.tree.map(
    one,
    mdef.logical,
    mdef.abstract_params(),
    param_specs(mdef, plan),
    is_leaf=lambda x: isinstance(x, tuple) and not _is_spec(x),
  )


def fsdp_axes(mdef, plan) -> set[str]:
  """Mesh axes that split some parameter's `embed` dim (ZeRO-3 style data-parallel sharding)."""
  import jax

  from jaxllm.parallel.manual import fsdp_gathers

  gathers = jax.tree.leaves(fsdp_gathers(mdef, plan), is_leaf=lambda x: isinstance(x, tuple))
  return {a for _, axes in gathers for a in _entry_axes(axes)}
