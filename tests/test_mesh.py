"""Mesh plan (common refinement of the attention and MoE factorizations), Megatron rank order,
the logical rules table, mesh presets, and rejection of illegal configurations before compiling."""
import glob
import os
import tomllib

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import ConfigError, MeshConfig, load_config
from jaxllm.parallel import build_mesh, format_rank_table, logical_spec, plan_mesh
from jaxllm.parallel.mesh import rank_table

MESHES = os.path.join(os.path.dirname(__file__), "..", "meshes")


def test_design_example_axes():
  # The worked example of docs/architecture.md: tp=2 dp=4, etp=1 ep=4 edp=2 -> boundaries {1,2,4,8}
  # -> three axes of size 2.
  plan = plan_mesh(MeshConfig(dp=4, tp=2, ep=4, etp=1))
  assert plan.axis_names == ("pp", "f2", "f1", "f0") and plan.axis_sizes == (1, 2, 2, 2)
  assert plan.dims["tp"] == ("f0",) and plan.dims["dp"] == ("f2", "f1")
  assert plan.dims["ep"] == ("f1", "f0") and plan.dims["edp"] == ("f2",) and plan.dims["etp"] == ()
  assert [plan.size(d) for d in ("dp", "tp", "edp", "ep", "etp")] == [4, 2, 2, 4, 1]


@pytest.mark.parametrize("pp,dp,tp,ep,etp", [(1, 4, 2, 8, 1), (1, 2, 4, 4, 2), (1, 4, 2, 4, 1), (1, 8, 1, 2, 1),
                                             (1, 1, 8, 8, 1), (1, 2, 4, 2, 2), (2, 2, 2, 4, 1), (2, 4, 1, 1, 2)])
def test_rank_table_is_megatron_order(pp, dp, tp, ep, etp):
  """Device i (in mesh order) has Megatron's ranks: tp / etp inner-most, then dp / ep, pp outer-most;
  so both factorizations cover the same devices, and each coordinate tuple is unique."""
  mc = MeshConfig(pp=pp, dp=dp, tp=tp, ep=ep, etp=etp, microbatches=max(pp, 1))
  mesh, plan = build_mesh(mc)
  rows = rank_table(mesh, plan)
  n = dp * tp
  order = {int(d.id): i for i, d in enumerate(mesh.devices.reshape(-1))}
  for dev, r in rows:
    i = order[dev]
    j = i % n     # position inside the stage
    assert r == {"pp": i // n, "tp": j % tp, "dp": j // tp, "etp": j % etp,
                 "ep": (j // etp) % ep, "edp": j // (etp * ep)}, (dev, r)
  assert len({(r["pp"], r["dp"], r["tp"]) for _, r in rows}) == 8
  assert len({(r["pp"], r["edp"], r["ep"], r["etp"]) for _, r in rows}) == 8
  text = format_rank_table(mesh, plan)
  assert len(text.splitlines()) == 2 + 8 and f"edp={mc.edp}" in text


def test_logical_rules():
  plan = plan_mesh(MeshConfig(dp=2, tp=4, ep=4, etp=2))   # tp=(f1,f0), etp=(f0,), ep=(f2,f1)
  assert plan.dims["tp"] == ("f1", "f0") and plan.dims["etp"] == ("f0",) and plan.dims["ep"] == ("f2", "f1")
  assert logical_spec(plan, ("layers", "exp", "embed", "moe_mlp"), (2, 8, 64, 32)) == P(None, ("f2", "f1"), None, "f0")
  assert logical_spec(plan, ("layers", "embed", "heads", "head_dim"), (2, 64, 8, 8)) == P(None, None, ("f1", "f0"), None)
  assert logical_spec(plan, ("batch", "seq")) == P("f2", None)
  # 2 kv heads cannot split 4 ways: replicated (as Megatron replicates kv heads when tp > K).
  assert logical_spec(plan, ("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 8)) == P(None, None, None, None)
  with pytest.raises(KeyError, match="no rule"):
    logical_spec(plan, ("bogus",))


@pytest.mark.parametrize("kwargs,match", [
  (dict(dp=4, tp=2, ep=3), r"ep \* mesh.etp = 3\*1 must divide dp\*tp = 8"),
  (dict(dp=4, tp=2, ep=0), "mesh.ep=0 must be >= 1"),
  (dict(pp=2, dp=2, tp=2, microbatches=1), "microbatches=1 must be >= mesh.pp=2"),
])
def test_illegal_mesh_config_rejected(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    MeshConfig(**kwargs)


def test_unnestable_folding_rejected_with_working_sizes():
  # tp=3 x dp=2 vs ep=2 x edp=3: groups of 3 (attention) and 2 (MoE) have no common device order.
  with pytest.raises(ConfigError, match=r"3 does not divide|2 does not divide") as e:
    plan_mesh(MeshConfig(dp=2, tp=3, ep=2))
  suggested = "[(1, 1), (1, 3), (1, 6), (2, 3), (3, 1), (6, 1)]"
  assert f"Sizes that work for ep*etp with tp=3: {suggested}" in str(e.value)
  for ep, etp in eval(suggested):   # every suggestion really plans
    plan_mesh(MeshConfig(dp=2, tp=3, ep=ep, etp=etp))


def test_wrong_device_count_and_expert_count_rejected():
  with pytest.raises(ConfigError, match="needs pp\\*dp\\*tp = 1\\*4\\*1 = 4 devices but 8 exist"):
    build_mesh(MeshConfig(dp=4))
  with pytest.raises(ConfigError, match="n_experts=6 must be divisible by mesh.ep=4"):
    load_config(overrides=["model=tiny-moe", "model.n_experts=6", "mesh.dp=4", "mesh.tp=2", "mesh.ep=4",
                           "train.batch_size=8"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(MESHES, "*.toml"))), ids=os.path.basename)
def test_mesh_presets(path):
  with open(path) as f:
    assert f.readline().startswith("# "), f"{path} must start with a comment saying when to use it"
  with open(path, "rb") as f:
    mc = MeshConfig(**tomllib.load(f)["mesh"])
  # Loads as the CLI does, given a batch the mesh can split.
  assert load_config([path], [f"train.batch_size={mc.microbatches * mc.dp}"]).mesh == mc
  assert mc.name == os.path.basename(path)[:-5]
  plan = plan_mesh(mc)                                  # the folding nests
  assert plan.size("dp") * plan.size("tp") == mc.edp * mc.ep * mc.etp
  if mc.device == "cpu":
    assert mc.num_devices in (1, len(jax.devices()))
    build_mesh(mc, jax.devices()[:mc.num_devices])


def test_device_grid_keeps_local_order_off_tpu():
  """On CPU the mesh keeps the given device order, inner axes fastest, also for a subset
  of the devices (the serving meshes use jax.devices()[:n])."""
  from jaxllm.parallel.mesh import device_grid
  devs = jax.devices()[4:]
  assert [d.id for d in device_grid((2, 2), devs).flat] == [d.id for d in devs]
  mesh, plan = build_mesh(MeshConfig(pp=2, dp=2, tp=2, microbatches=2))
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
