"""Build the sharded TrainState for a mesh: parameter shardings from the logical rules, optimizer
state shardings mirroring the parameters, everything created directly on its devices.

Layouts. On disk (checkpoints, exports) layer params are always canonical [L, ...]. In memory they
are canonical too, except on a pipeline mesh (pp > 1), where the train state keeps them -- and their
optimizer moments -- in the pipeline layout [vpp, pp, C, ...] (jaxllm.parallel.pipeline): each stage
holds exactly its chunks, so no step moves weights between stages. `Layout` converts at
save/restore, which is how a checkpoint written on any mesh loads on any other."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.model.params import ModelDef, init_params
from jaxllm.parallel.mesh import MeshPlan
from jaxllm.parallel.pipeline import (
  canonical_params,
  from_pipeline_layout,
  staged_params,
  staged_shardings,
  to_pipeline_layout,
)
from jaxllm.parallel.sharding import opt_state_shardings, param_shardings
from jaxllm.train.step import TrainState


@dataclass(frozen=True)
class Layout:
  """In-memory layout of the layer params: canonical (pp = 1) or pipeline [vpp, pp, C, ...] (pp > 1)."""

  pp: int = 1
  vpp: int = 1

  @staticmethod
  def of(plan: MeshPlan) -> "Layout":
    return Layout(plan.cfg.pp, plan.cfg.vpp) if plan.cfg.pp > 1 else Layout()

  @property
  def staged(self) -> bool:
    return self.pp > 1

  def params_in(self, params: dict) -> dict:
    """Canonical params -> this layout."""
    return staged_params(params, self.pp, self.vpp) if self.staged else params

  def params_out(self, params: dict) -> dict:
    """This layout -> canonical params."""
    return canonical_params(params) if self.staged else params

  def state(self, tx, state: TrainState, to_memory: bool) -> TrainState:
    """Convert params and optimizer moments between disk (canonical) and this layout."""
    if not self.staged:
      return state
    conv = (lambda x: to_pipeline_layout(x, self.pp, self.vpp)) if to_memory else from_pipeline_layout
    flags = {k: jax.tree.map(lambda _: k == "layers", v) for k, v in state.params.items()}
    one = lambda x, is_layer: conv(x) if is_layer else x
    return TrainState(
      jax.tree.map(one, state.params, flags), optax.tree_map_params(tx, one, state.opt_state, flags), state.step
    )


def state_shardings(
  mdef: ModelDef, tx: optax.GradientTransformation, mesh, plan: MeshPlan, layout: Layout | None = None
) -> TrainState:
  """TrainState of NamedShardings in `layout` (default: the mesh's, Layout.of(plan)): parameters by
  the logical rules (pipeline layout: each stage holds its chunks), optimizer moments following their
  parameter, the step count replicated. `layout=Layout()` gives the canonical (checkpoint) placement."""
  layout = Layout.of(plan) if layout is None else layout
  p_sh = staged_shardings(mdef, mesh, plan) if layout.staged else param_shardings(mdef, mesh, plan)
  abstract = jax.eval_shape(layout.params_in, mdef.abstract_params())
  return TrainState(p_sh, opt_state_shardings(tx, abstract, p_sh, mesh), NamedSharding(mesh, P()))


def init_state(
  mdef: ModelDef, tx, shardings: TrainState, seed: int, params=None, layout: Layout = Layout()
) -> TrainState:
  """Fresh state created on its shardings (in `layout`); `params` (canonical, e.g. imported weights)
  replaces random init."""

  def make(params):
    if params is None:
      params = init_params(mdef.cfg, seed)
    params = layout.params_in(params)
    return TrainState(params, tx.init(params), jnp.int32(0))

  if params is None:
    return jax.jit(functools.partial(make, None), out_shardings=shardings)()
  return jax.jit(make, out_shardings=shardings)(params)


def relayout(tx, state: TrainState, layout: Layout, shardings: TrainState, to_memory: bool) -> TrainState:
  """`state` converted between disk and `layout`, placed on `shardings` (a copy; the input stays)."""
  if not layout.staged:
    return state
  key = (id(tx), layout, id(shardings), to_memory)
  if key not in _RELAYOUT:  # compiled once per run, not at every save; the entry keeps tx and shardings alive
    _RELAYOUT[key] = (tx, shardings, jax.jit(lambda s: layout.state(tx, s, to_memory), out_shardings=shardings))
  return _RELAYOUT[key][2](state)


_RELAYOUT: dict = {}


def abstract_state(mdef: ModelDef, tx, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs with concrete shardings: the restore target for checkpoints (canonical
  shardings, see state_shardings(layout=Layout()))."""
  shapes = jax.eval_shape(lambda: (lambda p: TrainState(p, tx.init(p), jnp.int32(0)))(mdef.abstract_params()))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
