"""Logical axis names -> physical mesh axes: the one rules table, and helpers that apply it to
parameters (NNX `logical` metadata) and activations (the model's `constrain` hook)."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

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
  "layers": None,
  "stage": "pp",
}


def logical_spec(plan: MeshPlan, names, shape=None) -> P:
  """PartitionSpec for an array with these logical names. A dim whose size the axes do not divide
  (e.g. 2 kv heads under tp=4) stays replicated, as Megatron replicates kv heads when tp > K."""
  sizes = dict(zip(plan.axis_names, plan.axis_sizes))
  used, spec = set(), []
  for i, name in enumerate(names):
    dim = LOGICAL_RULES.get(name) if name is not None else None
    if name is not None and name not in LOGICAL_RULES:
      raise KeyError(f"logical axis {name!r} has no rule in jaxllm.parallel.sharding.LOGICAL_RULES")
    axes = tuple(a for a in plan.dims.get(dim, ()) if sizes[a] > 1) if dim else ()
    n = int(np.prod([sizes[a] for a in axes], dtype=np.int64))
    if not axes or used & set(axes) or (shape is not None and shape[i] % n):
      spec.append(None)
    else:
      used |= set(axes)
      spec.append(axes if len(axes) > 1 else axes[0])
  return P(*spec)


def state_shardings(state, mesh, plan: MeshPlan):
  """NamedSharding for every leaf of an NNX state (abstract or concrete) from its `logical` metadata.
  Variables without logical names (optimizer counts, ...) are replicated."""
  def one(v):
    names = v.get_metadata().get("logical") if isinstance(v, nnx.Variable) else None
    shape = v.shape if hasattr(v, "shape") else ()
    if names is None or len(names) != len(shape):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_spec(plan, names, shape))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def activation_constrainer(mesh, plan: MeshPlan):
  """The model's `constrain` hook for this mesh (auto-sharded jit, outside shard_map)."""
  def constrain(x, names):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(plan, names, x.shape)))
  return constrain
