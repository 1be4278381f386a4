"""Mesh construction, logical->physical sharding rules (MoE Parallel Folding), expert-parallel
dispatch and the pipeline schedule. The model never imports this package; these install hooks."""
from jaxllm.parallel.mesh import MeshPlan, build_mesh, format_rank_table, plan_mesh
from jaxllm.parallel.sharding import LOGICAL_RULES, activation_constrainer, logical_spec


def mesh_hooks(mesh, plan: MeshPlan, model_cfg) -> dict:
  """Keyword arguments for `jaxllm.model.hooks.using(...)` that make the model run on this mesh."""
  return {"constrain": activation_constrainer(mesh, plan)}


__all__ = ["MeshPlan", "build_mesh", "format_rank_table", "plan_mesh", "LOGICAL_RULES",
           "activation_constrainer", "logical_spec", "mesh_hooks"]
