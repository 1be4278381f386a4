"""Parameters as plain nested dicts of arrays (the canonical, checkpointed layout) and the
bridge back to the NNX module: `ModelDef.bind(params)` gives a Transformer over given arrays.

Keeping training state as pure pytrees lets jit, shardings, optax and orbax see ordinary arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.transformer import Transformer


def _is_var(x):
  return isinstance(x, nnx.Variable)


@dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class ModelDef:
  cfg: ModelConfig
  graphdef: Any
  template: Any  # abstract nnx.State (shapes, dtypes, metadata)
  logical: dict  # same tree as params; leaves are tuples of logical axis names

  def bind(self, params: dict) -> Transformer:
    """A Transformer whose parameters are `params` (arrays or tracers); no copy."""
    state = jax.tree.map(lambda v: v, self.template, is_leaf=_is_var)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def abstract_params(self) -> dict:
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(self.template))


def model_def(cfg: ModelConfig) -> ModelDef:
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  logical = jax.tree.map(lambda v: tuple(v.get_metadata()["logical"]), state, is_leaf=_is_var)
  logical = nnx.to_pure_dict(logical)
  return ModelDef(cfg, graphdef, state, logical)


def init_params(cfg: ModelConfig, seed: int) -> dict:
  """Fresh random parameters (pure dict). jit this with out_shardings for sharded init."""
  return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(seed))))


def count_params(params: dict) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
