"""Logical axis names -> physical mesh axes: the one rules table, and the helpers that apply it to
parameters (the model's `logical` names), optimizer state, token batches and activations (the
model's `constrain` hook). Training, serving and checkpoint loading all place arrays through here."""

from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.parallel.mesh import MeshPlan

# logical name -> parallel dim. Attention and dense names use dp/tp; expert names use ep/etp.
LOGICAL_RULES = {
  "batch": "dp",
  "seq": None,
  "embed": None,
  "heads": "tp",
  "kv_heads": "tp",
  "head_dim": None,
  "mlp": "tp",
  "vocab": "tp",
  "exp": "ep",
  "moe_mlp": "etp",
  # The stacked layer dim [L, ...] splits over the pipeline stages in contiguous blocks (nothing
  # when pp = 1); jaxllm.parallel.pipeline regroups it into [vpp, pp, C, ...] inside the step.
  "layers": "pp",
}
# Parameters (and so gradients and optimizer moments) also split their model dim over the FSDP axes
# (ZeRO-3, Rajbhandari et al. 2020; MaxText's `fsdp` axis); activations keep it whole. Each layer's
# weights are gathered where they are used: by XLA inside the layer scan under auto-sharding, by
# jaxllm.parallel.manual.gather_fsdp inside the pipeline.
PARAM_RULES = {**LOGICAL_RULES, "embed": "fsdp"}


def logical_spec(plan: MeshPlan, names, shape=None, rules=LOGICAL_RULES) -> P:
  """PartitionSpec for an array with these logical names. A dim whose size the axes do not divide
  (e.g. 2 kv heads under tp=4) stays replicated, as Megatron replicates kv heads when tp > K. A dim
  gets only the axes an earlier dim has not taken (an expert weight's model dim gets the FSDP axes
  that ep does not already split)."""
  sizes = dict(zip(plan.axis_names, plan.axis_sizes))
  used, spec = set(), []
  for i, name in enumerate(names):
    dim = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no rule in jaxllm.parallel.sharding.LOGICAL_RULES")
    axes = tuple(a for a in plan.dims.get(dim, ()) if sizes[a] > 1 and a not in used) if dim else ()
    n = int(np.prod([sizes[a] for a in axes], dtype=np.int64))
    if not axes or (shape is not None and shape[i] % n):
      spec.append(None)
    else:
      used |= set(axes)
      spec.append(axes if len(axes) > 1 else axes[0])
  return P(*spec)


def param_specs(mdef, plan: MeshPlan):
  """PartitionSpec of every parameter of `mdef` (a jaxllm.model.params.ModelDef) from its logical
  names (also the in_specs of code partitioned by hand, jaxllm.parallel.manual)."""
  return jax.tree.map(
    lambda names, a: logical_spec(plan, names, a.shape, PARAM_RULES),
    mdef.logical,
    mdef.abstract_params(),
    is_leaf=lambda x: isinstance(x, tuple),
  )


def param_shardings(mdef, mesh, plan: MeshPlan):
  """NamedSharding of every parameter of `mdef`: the placement used by training (pp=1), serving and
  checkpoint loading."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(mdef, plan), is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, plan: MeshPlan) -> NamedSharding:
  """Token batches [B, T]: rows over the data-parallel axes."""
  return NamedSharding(mesh, logical_spec(plan, ("batch", "seq")))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, params_sh, mesh):
  """Shardings of `tx`'s state: every moment follows its parameter's sharding, the rest (step
  counts, ...) is replicated."""
  replicated = NamedSharding(mesh, P())
  opt_abstract = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, sh: sh, opt_abstract, params_sh, transform_non_params=lambda _: replicated)


def activation_constrainer(mesh, plan: MeshPlan):
  """The model's `constrain` hook for this mesh (auto-sharded jit, outside shard_map)."""

  def constrain(x, names):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(plan, names, x.shape)))

  return constrain
