"""Mesh plan (common refinement of the attention and MoE factorizations), Megatron rank order,
the logical rules table, mesh presets, and rejection of illegal configurations before compiling."""

import glob
import math
import os
import tomllib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import ConfigError, MeshConfig, load_config
from jaxllm.parallel import build_mesh, format_rank_table, logical_spec, plan_mesh
from jaxllm.parallel.mesh import dcn_axis_sizes, device_grid, rank_table

MESHES = os.path.join(os.path.dirname(__file__), "..", "..", "meshes")


def test_design_example_axes():
  # The worked example of docs/architecture.md: tp=2 dp=4, etp=1 ep=4 edp=2 -> boundaries {1,2,4,8}
  # -> three axes of size 2.
  plan = plan_mesh(MeshConfig(dp=4, tp=2, ep=4, etp=1))
  assert plan.axis_names == ("pp", "f2", "f1", "f0") and plan.axis_sizes == (1, 2, 2, 2)
  assert plan.dims["tp"] == ("f0",) and plan.dims["dp"] == ("f2", "f1")
  assert plan.dims["ep"] == ("f1", "f0") and plan.dims["edp"] == ("f2",) and plan.dims["etp"] == ()
  assert [plan.size(d) for d in ("dp", "tp", "edp", "ep", "etp")] == [4, 2, 2, 4, 1]


@pytest.mark.parametrize(
  "pp,dp,tp,ep,etp",
  [
    (1, 4, 2, 8, 1),
    (1, 2, 4, 4, 2),
    (1, 4, 2, 4, 1),
    (1, 8, 1, 2, 1),
    (1, 1, 8, 8, 1),
    (1, 2, 4, 2, 2),
    (2, 2, 2, 4, 1),
    (2, 4, 1, 1, 2),
  ],
)
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
    j = i % n  # position inside the stage
    assert r == {
      "pp": i // n,
      "tp": j % tp,
      "dp": j // tp,
      "etp": j % etp,
      "ep": (j // etp) % ep,
      "edp": j // (etp * ep),
      "fsdp": 0,
    }, (dev, r)
  assert len({(r["pp"], r["dp"], r["tp"]) for _, r in rows}) == 8
  assert len({(r["pp"], r["edp"], r["ep"], r["etp"]) for _, r in rows}) == 8
  text = format_rank_table(mesh, plan)
  assert len(text.splitlines()) == 2 + 8 and f"edp={mc.edp}" in text


def test_logical_rules():
  plan = plan_mesh(MeshConfig(dp=2, tp=4, ep=4, etp=2))  # tp=(f1,f0), etp=(f0,), ep=(f2,f1)
  assert plan.dims["tp"] == ("f1", "f0") and plan.dims["etp"] == ("f0",) and plan.dims["ep"] == ("f2", "f1")
  assert logical_spec(plan, ("layers", "exp", "embed", "moe_mlp"), (2, 8, 64, 32)) == P(None, ("f2", "f1"), None, "f0")
  assert logical_spec(plan, ("layers", "embed", "heads", "head_dim"), (2, 64, 8, 8)) == P(
    None, None, ("f1", "f0"), None
  )
  assert logical_spec(plan, ("batch", "seq")) == P("f2", None)
  # 2 kv heads cannot split 4 ways: replicated (as Megatron replicates kv heads when tp > K).
  assert logical_spec(plan, ("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 8)) == P(None, None, None, None)
  with pytest.raises(KeyError, match="no rule"):
    logical_spec(plan, ("bogus",))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(dp=4, tp=2, ep=3), r"ep \* mesh.etp = 3\*1 must divide dp\*tp = 8"),
    (dict(dp=4, tp=2, ep=0), "mesh.ep=0 must be >= 1"),
    (dict(pp=2, dp=2, tp=2, microbatches=1), "microbatches=1 must be >= mesh.pp=2"),
  ],
)
def test_illegal_mesh_config_rejected(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    MeshConfig(**kwargs)


def test_unnestable_folding_rejected_with_working_sizes():
  # tp=3 x dp=2 vs ep=2 x edp=3: groups of 3 (attention) and 2 (MoE) have no common device order.
  with pytest.raises(ConfigError, match=r"3 does not divide|2 does not divide") as e:
    plan_mesh(MeshConfig(dp=2, tp=3, ep=2))
  suggested = "[(1, 1), (1, 3), (1, 6), (2, 3), (3, 1), (6, 1)]"
  assert f"Sizes that work for ep*etp with tp=3: {suggested}" in str(e.value)
  for ep, etp in eval(suggested):  # every suggestion really plans
    plan_mesh(MeshConfig(dp=2, tp=3, ep=ep, etp=etp))


def test_wrong_device_count_and_expert_count_rejected():
  with pytest.raises(ConfigError, match="needs pp\\*dp\\*tp = 1\\*4\\*1 = 4 devices but 8 exist"):
    build_mesh(MeshConfig(dp=4))
  with pytest.raises(ConfigError, match="n_experts=6 must be divisible by mesh.ep=4"):
    load_config(
      overrides=["model=tiny-moe", "model.n_experts=6", "mesh.dp=4", "mesh.tp=2", "mesh.ep=4", "train.batch_size=8"]
    )


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(MESHES, "*.toml"))), ids=os.path.basename)
def test_mesh_presets(path):
  with open(path) as f:
    assert f.readline().startswith("# "), f"{path} must start with a comment saying when to use it"
  with open(path, "rb") as f:
    mc = MeshConfig(**tomllib.load(f)["mesh"])
  # Loads as the CLI does, given a batch the mesh can split.
  assert load_config([path], [f"train.batch_size={mc.microbatches * mc.dp}"]).mesh == mc
  assert mc.name == os.path.basename(path)[:-5]
  plan = plan_mesh(mc)  # the folding nests
  assert plan.size("dp") * plan.size("tp") == mc.edp * mc.ep * mc.etp
  dcn = dcn_axis_sizes(plan)  # the host/slice-crossing factors can be placed
  assert math.prod(dcn) == mc.dcn_pp * mc.dcn_dp
  if mc.device == "cpu":
    assert mc.num_devices in (1, len(jax.devices()))
    build_mesh(mc, jax.devices()[: mc.num_devices])


def test_device_grid_keeps_local_order_off_tpu():
  """On CPU the mesh keeps the given device order, inner axes fastest, also for a subset
  of the devices (the serving meshes use jax.devices()[:n])."""
  from jaxllm.parallel.mesh import device_grid

  devs = jax.devices()[4:]
  assert [d.id for d in device_grid((2, 2), devs).flat] == [d.id for d in devs]
  mesh, plan = build_mesh(MeshConfig(pp=2, dp=2, tp=2, microbatches=2))
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]


# ---------------------------------------------------------------------------------------------
# Meshes across hosts / slices (mesh.dcn_pp, mesh.dcn_dp): fake devices, so no multi-host run needed.


class FakeDevice:
  """What mesh_utils reads of a GPU device (id, platform, device_kind) plus its host (process_index)
  and, for TPU multi-slice, its slice_index."""

  def __init__(self, id, process_index, slice_index=None):
    self.id, self.process_index = id, process_index
    self.platform, self.device_kind = "gpu", "NVIDIA H100 80GB HBM3"
    if slice_index is not None:
      self.slice_index = slice_index

  def __repr__(self):
    return f"FakeDevice({self.id}, host={self.process_index})"


def fake_hosts(hosts: int, per_host: int) -> list[FakeDevice]:
  # Ids interleave the hosts and the list is shuffled, so neither the id order (create_device_mesh's
  # order on GPU) nor the given order keeps a host's devices together: only the hybrid layout does.
  devs = [FakeDevice(i, i % hosts) for i in range(hosts * per_host)]
  return [devs[i] for i in np.random.default_rng(0).permutation(len(devs))]


def groups(grid, plan, dim) -> list[list]:
  """The device groups of a parallel dim: devices that differ only in dim's physical axes."""
  axes = [plan.axis_names.index(a) for a in plan.dims[dim]]
  rest = [i for i in range(grid.ndim) if i not in axes]
  size = math.prod(grid.shape[i] for i in axes)
  return [list(g) for g in np.transpose(grid, rest + axes).reshape(-1, size)]


def hosts_of(group) -> set[int]:
  return {d.process_index for d in group}


@pytest.mark.parametrize(
  "kwargs,hosts",
  [
    (dict(dp=4, tp=2, dcn_dp=2), 2),  # 2 hosts x 4: dp crosses, tp inside
    (dict(dp=4, tp=2, ep=4, dcn_dp=2), 2),  # folded: ep=(f1,f0) inside, edp crosses
    (dict(pp=2, dp=2, tp=2, microbatches=2, dcn_pp=2), 2),  # stages on different hosts
    (dict(pp=2, dp=2, tp=2, microbatches=2, dcn_pp=2, dcn_dp=2), 4),
    (dict(dp=8, tp=2, ep=4, dcn_dp=2), 2),  # dcn_dp takes part of the outer dp axis
    (dict(pp=2, vpp=2, dp=4, tp=8, ep=8, microbatches=8, dcn_pp=2, dcn_dp=4), 8),  # h100-8x8
  ],
)
def test_hybrid_mesh_keeps_tp_ep_inside_a_host(kwargs, hosts):
  mc = MeshConfig(**kwargs)
  plan = plan_mesh(mc)
  devs = fake_hosts(hosts, mc.num_devices // hosts)
  dcn = dcn_axis_sizes(plan)
  grid = device_grid(plan.axis_sizes, devs, dcn)
  assert grid.shape == plan.axis_sizes and sorted(d.id for d in grid.flat) == list(range(len(devs)))
  for dim in ("tp", "ep", "etp"):  # fast-network groups never leave a host
    assert all(len(hosts_of(g)) == 1 for g in groups(grid, plan, dim)), dim
  for dim, k in (("pp", mc.dcn_pp), ("dp", mc.dcn_dp)):  # slow-network groups span dcn_* hosts
    if plan.dims[dim]:
      assert all(len(hosts_of(g)) == k for g in groups(grid, plan, dim)), dim
  # The dcn factor sits on the outer axes: pp first, then dp's outermost physical axes.
  assert dcn[0] == mc.dcn_pp and math.prod(dcn[plan.axis_names.index(a)] for a in plan.dims["dp"]) == mc.dcn_dp
  inner = {a for d in ("tp", "ep", "etp") for a in plan.dims[d]}
  assert all(dcn[plan.axis_names.index(a)] == 1 for a in inner)


def test_hybrid_mesh_splits_dcn_dp_over_several_dp_axes():
  """With FSDP the dp ways are two physical axes; dcn_dp=4 takes both (outer-first), tp stays inside."""
  if "fsdp" not in MeshConfig.__dataclass_fields__:
    pytest.skip("no mesh.fsdp")
  mc = MeshConfig(dp=4, fsdp=2, tp=2, dcn_dp=4)
  plan = plan_mesh(mc)
  dcn = dcn_axis_sizes(plan)
  assert math.prod(dcn) == 4
  grid = device_grid(plan.axis_sizes, fake_hosts(4, 2), dcn)
  assert all(len(hosts_of(g)) == 1 for g in groups(grid, plan, "tp"))
  assert all(len(hosts_of(g)) == 4 for g in groups(grid, plan, "dp"))


def test_hybrid_mesh_uses_slices_when_devices_span_several():
  """TPU multi-slice: the granules are slices (slice_index), not hosts; 2 slices x 2 hosts x 2 chips."""
  devs = [FakeDevice(i, process_index=i // 2, slice_index=i // 4) for i in range(8)]
  mc = MeshConfig(dp=4, tp=2, ep=4, dcn_dp=2)
  plan = plan_mesh(mc)
  grid = device_grid(plan.axis_sizes, devs, dcn_axis_sizes(plan))
  for dim in ("tp", "ep"):
    assert all(len({d.slice_index for d in g}) == 1 for g in groups(grid, plan, dim))
  assert all(len({d.slice_index for d in g}) == 2 for g in groups(grid, plan, "dp"))


def test_one_host_keeps_the_single_host_layout():
  """dcn factors on one host (or the emulated CPU mesh) change nothing: the layout is today's."""
  mc = MeshConfig(pp=2, dp=2, tp=2, microbatches=2, dcn_pp=2, dcn_dp=2)
  mesh, plan = build_mesh(mc)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
  devs = [FakeDevice(i, 0) for i in range(8)]
  assert (device_grid(plan.axis_sizes, devs, dcn_axis_sizes(plan)) == device_grid(plan.axis_sizes, devs)).all()


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(dp=4, dcn_dp=3), r"mesh.dcn_dp=3 must divide mesh.dp=4 .*use one of \[1, 2, 4\]"),
    (dict(pp=2, microbatches=2, dcn_pp=4), r"mesh.dcn_pp=4 must divide mesh.pp=2 .*use one of \[1, 2\]"),
    (dict(dcn_dp=0), "mesh.dcn_dp=0 must be >= 1"),
  ],
)
def test_illegal_dcn_config_rejected(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    MeshConfig(**kwargs)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    # Folded dp=4 tp=2 ep=4: dp=(f2,f1), ep=(f1,f0); dcn_dp=4 would put f1, an ep axis, across hosts.
    (dict(dp=4, tp=2, ep=4, dcn_dp=4), r"axis f1 is also ep's.*dcn_dp values that work here: \[1, 2\]"),
    # dp=6 ep=3: dp's outer axis has size 2, which a cross-host factor of 3 cannot fill or split.
    (dict(dp=6, ep=3, dcn_dp=3), r"axis f1 of size 2 neither divides nor is divided by the factor 3.*\[1, 2\]"),
  ],
)
def test_unplaceable_dcn_rejected_with_working_values(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    dcn_axis_sizes(plan_mesh(MeshConfig(**kwargs)))


def test_host_count_must_match_dcn_factors():
  plan = plan_mesh(MeshConfig(dp=4, tp=2, dcn_dp=2))
  dcn = dcn_axis_sizes(plan)
  with pytest.raises(ConfigError, match=r"8 devices span 4 hosts.*mesh.dcn_pp \* mesh.dcn_dp = 4"):
    device_grid(plan.axis_sizes, fake_hosts(4, 2), dcn)
  uneven = [FakeDevice(i, int(i >= 3)) for i in range(8)]
  with pytest.raises(ConfigError, match=r"different numbers of devices \[3, 5\]"):
    device_grid(plan.axis_sizes, uneven, dcn)
