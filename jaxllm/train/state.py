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
from jaxllm.parallel.sharding import opt_state_shardings, param_shardings
from jaxllm.train.step import TrainState


def state_shardings(mdef: ModelDef, tx: optax.GradientTransformation, mesh, plan: MeshPlan) -> TrainState:
  """TrainState of NamedShardings: parameters by the logical rules (on a pp > 1 mesh the layer stack
  is split over the stages, so each stage keeps and updates only its layers), optimizer moments
  following their parameter, the step count replicated."""
  p_sh = param_shardings(mdef, mesh, plan)
  return TrainState(p_sh, opt_state_shardings(tx, mdef.abstract_params(), p_sh, mesh), NamedSharding(mesh, P()))


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
