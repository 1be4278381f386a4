"""Build the sharded TrainState for a mesh: parameter shardings from the logical rules, optimizer
state shardings mirroring the parameters, everything created directly on its devices."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.model.params import ModelDef, init_params
from jaxllm.parallel.mesh import MeshPlan
from jaxllm.parallel.sharding import logical_spec
from jaxllm.train.step import TrainState


def param_shardings(mdef: ModelDef, mesh, plan: MeshPlan):
  abstract = mdef.abstract_params()
  return jax.tree.map(lambda names, a: NamedSharding(mesh, logical_spec(plan, names, a.shape)),
                      mdef.logical, abstract, is_leaf=lambda x: isinstance(x, tuple))


def state_shardings(mdef: ModelDef, tx: optax.GradientTransformation, mesh, plan: MeshPlan,
                    params=None) -> TrainState:
  """Optimizer moments follow their parameter's sharding; `params` overrides the rules-derived
  parameter shardings (the pipeline splits the layer stack over stages)."""
  p_sh = params if params is not None else param_shardings(mdef, mesh, plan)
  replicated = NamedSharding(mesh, P())
  opt_abstract = jax.eval_shape(tx.init, mdef.abstract_params())
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_abstract, p_sh,
                                 transform_non_params=lambda _: replicated)
  return TrainState(p_sh, opt_sh, replicated)


def init_state(mdef: ModelDef, tx, shardings: TrainState, seed: int, params=None) -> TrainState:
  """Fresh state created on its shardings; `params` (e.g. imported weights) replaces random init."""
  def make(params):
    if params is None:
      params = init_params(mdef.cfg, seed)
    return TrainState(params, tx.init(params), jnp.int32(0))
  if params is None:
    return jax.jit(functools.partial(make, None), out_shardings=shardings)()
  params = jax.device_put(params, shardings.params)
  return jax.jit(make, out_shardings=shardings)(params)


def abstract_state(mdef: ModelDef, tx, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs with concrete shardings: the restore target for checkpoints."""
  shapes = jax.eval_shape(lambda: (lambda p: TrainState(p, tx.init(p), jnp.int32(0)))(mdef.abstract_params()))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def batch_sharding(mesh, plan: MeshPlan) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(plan, ("batch", "seq")))
