"""Mesh construction, logical->physical sharding rules (MoE Parallel Folding), expert-parallel
dispatch and the pipeline schedule. The model never imports this package; these install hooks."""

from jaxllm.parallel.mesh import MeshPlan, build_mesh, format_rank_table, plan_mesh
from jaxllm.parallel.moe import expert_parallel
from jaxllm.parallel.sharding import (
  LOGICAL_RULES,
  activation_constrainer,
  batch_sharding,
  logical_spec,
  opt_state_shardings,
  param_shardings,
)


def mesh_hooks(mesh, plan: MeshPlan, model_cfg, capacity_factor: float = 0.0) -> dict:
  """Keyword arguments for `jaxllm.model.hooks.using(...)` that make the model run on this mesh.

  MoE models on more than one device per stage get the shard_map expert dispatch
  (`jaxllm.parallel.moe`): with ep or etp > 1 it is what shards the experts; with ep = etp = 1 it
  still keeps the token sort per device instead of a global, all-gathered sort under auto-sharding.
  `capacity_factor > 0` switches it to the token-dropping capacity mode."""
  hooks = {"constrain": activation_constrainer(mesh, plan)}
  if model_cfg.is_moe and plan.cfg.dp * plan.cfg.tp > 1:
    hooks["moe_experts"] = expert_parallel(mesh, plan, capacity_factor)
  return hooks


__all__ = [
  "MeshPlan",
  "build_mesh",
  "format_rank_table",
  "plan_mesh",
  "LOGICAL_RULES",
  "activation_constrainer",
  "batch_sharding",
  "logical_spec",
  "mesh_hooks",
  "expert_parallel",
  "opt_state_shardings",
  "param_shardings",
]
