"""The memory planner (jaxllm.planner) against XLA's compiled memory analysis of the real train step.

What is compared. The planner predicts, per device, the peak memory of one call of the jitted train
step: its arguments (train state + batch), the temporaries (gradients, activations, the head's fp32
logits) and the outputs that do not reuse an argument's buffer. The compiled figure it is held to is

    peak = argument_size + output_size - alias_size + temp_size     (CompiledMemoryStats)

of `step.lower(state, batch).compile().memory_analysis()`, where `step` is built exactly as
jaxllm.train.loop builds it (state_shardings, build_steps: the same hooks, pipeline and donation). On
the CPU backend these figures are per device: SPMD partitioning compiles one program per device,
and its arguments are the local shards (checked below: the planner's parameter + optimizer + batch
bytes equal `argument_size` exactly).

The models run in float32: XLA:CPU computes bfloat16 in float32 (a bf16 step's temp_size equals the
fp32 one's), so a bf16 prediction cannot be checked on this backend.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxllm import planner
from jaxllm.config import load_config
from jaxllm.model.params import model_def
from jaxllm.parallel import build_mesh
from jaxllm.parallel.sharding import batch_sharding
from jaxllm.train.loop import build_steps
from jaxllm.train.optim import make_optimizer
from jaxllm.train.state import Layout, state_shardings
from jaxllm.train.step import TrainState

TOLERANCE = 0.15


def compiled_memory(cfg):
  """Memory analysis of the real train step of `cfg`, compiled on abstract (sharded) inputs."""
  mesh, plan = build_mesh(cfg.mesh, jax.devices()[: cfg.mesh.num_devices])
  mdef = model_def(cfg.model)
  tx = make_optimizer(cfg.train, mdef.logical)
  shardings = state_shardings(mdef, tx, mesh, plan)
  layout = Layout.of(plan)
  shapes = jax.eval_shape(
    lambda a: (lambda p: TrainState(p, tx.init(p), jnp.int32(0)))(layout.params_in(a)), mdef.abstract_params()
  )
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  b_sh = batch_sharding(mesh, plan)
  B, T = cfg.train.batch_size, cfg.train.seq_len
  batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=b_sh) for k in ("inputs", "targets")}
  step, _ = build_steps(cfg, mdef, tx, mesh, plan, shardings)
  return step.lower(state, batch).compile().memory_analysis()


def peak(m) -> int:
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


# Scaled-down configurations where activations are most of the memory (long sequences, small model).
# The pipeline ones pin the naive attention (model.attention=xla); the others use the default (blockwise
# "flash" on CPU) or say which.
CONFIGS = {
  "dense dp4xtp2 remat=none": "model=tiny mesh=meshes/cpu-8.toml train.batch_size=16 train.seq_len=512",
  "moe folded ep4 remat=dots": (
    "model=tiny-moe mesh=meshes/cpu-8-fold.toml train.batch_size=16 train.seq_len=256 model.remat=dots"
  ),
  "pipeline pp2 vpp2 1f1b remat=none": (
    "model=tiny mesh=meshes/cpu-8-pp.toml train.batch_size=16 train.seq_len=256 model.attention=xla"
  ),
}
SLOW_CONFIGS = {
  "dense xla-attention remat=none": (
    "model=tiny mesh=meshes/cpu-8.toml train.batch_size=16 train.seq_len=512 model.attention=xla"
  ),
  "dense remat=full T=2048": (
    "model=tiny mesh=meshes/cpu-8.toml train.batch_size=16 train.seq_len=2048 model.remat=full"
  ),
  "dense remat=dots T=2048": "model=tiny mesh=meshes/cpu-8.toml train.batch_size=8 train.seq_len=2048 model.remat=dots",
  "dense chunked loss T=4096": (
    "model=tiny mesh=meshes/cpu-8.toml train.batch_size=8 train.seq_len=4096 model.remat=full model.vocab_size=8192"
  ),
  "dense grad_accum=2": "model=tiny mesh=meshes/cpu-8.toml train.batch_size=32 train.seq_len=256 train.grad_accum=2",
  "moe folded remat=none": "model=tiny-moe mesh=meshes/cpu-8-fold.toml train.batch_size=16 train.seq_len=256",
  "moe pipeline remat=full": (
    "model=tiny-moe mesh=meshes/cpu-8-pp.toml train.batch_size=16 "
    "train.seq_len=256 model.remat=full model.attention=xla"
  ),
  "pipeline remat=full": (
    "model=tiny mesh=meshes/cpu-8-pp.toml train.batch_size=16 train.seq_len=256 model.remat=full model.attention=xla"
  ),
  "dense fsdp=4": "model=tiny mesh=meshes/cpu-8.toml train.batch_size=16 train.seq_len=512 mesh.fsdp=4",
  "pipeline fsdp=2 remat=full": (
    "model=tiny mesh=meshes/cpu-8-pp.toml train.batch_size=16 "
    "train.seq_len=256 mesh.fsdp=2 model.remat=full model.attention=xla"
  ),
}


def check(overrides: str):
  cfg = load_config([], overrides.split())
  est = planner.estimate(cfg)
  m = compiled_memory(cfg)
  # The state and batch are known exactly: parameter shards, Adam moments, int32 token rows.
  assert est.arguments == pytest.approx(m.argument_size_in_bytes, rel=0.01), (est.arguments, m.argument_size_in_bytes)
  # Activations are a large share here, so the total checks the activation model, not just the state.
  assert est.temporaries > 2 * est.arguments
  ratio = est.total / peak(m)
  assert abs(ratio - 1) <= TOLERANCE, (
    f"{overrides}: predicted {est.total / 2**20:.1f} MiB, compiled "
    f"{peak(m) / 2**20:.1f} MiB (temp {m.temp_size_in_bytes / 2**20:.1f}, "
    f"planner temporaries {est.temporaries / 2**20:.1f}), ratio {ratio:.3f}"
  )


@pytest.mark.parametrize("overrides", list(CONFIGS.values()), ids=list(CONFIGS))
def test_prediction_within_15_percent_of_compiled(overrides):
  check(overrides)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", list(SLOW_CONFIGS.values()), ids=list(SLOW_CONFIGS))
def test_prediction_within_15_percent_of_compiled_more(overrides):
  check(overrides)


def test_shard_shape_ceil_divides_each_sharded_dim():
  sizes = {"pp": 1, "f1": 4, "f0": 2}
  assert planner.shard_shape((10, 6, 3), jax.sharding.PartitionSpec(("f1", "f0"), "f0"), sizes) == (2, 3, 3)
  assert planner.shard_shape((5,), jax.sharding.PartitionSpec(), sizes) == (5,)


def test_remat_orders_the_activation_estimate():
  base = "model=tiny mesh=meshes/cpu-8.toml train.batch_size=16 train.seq_len=256"
  saved = {
    r: planner.estimate(load_config([], f"{base} model.remat={r}".split())).activations["saved"]
    for r in ("none", "dots", "full")
  }
  assert saved["full"] < saved["dots"] < saved["none"]


def test_params_follow_param_specs_including_fsdp():
  """Parameter bytes come from param_specs: a mesh that shards `embed` over data-parallel ways (fsdp)
  shrinks parameters and Adam state without any rule in the planner."""
  base = load_config([], "model=tiny mesh=meshes/cpu-8.toml".split())
  if not hasattr(base.mesh, "fsdp"):
    pytest.skip("MeshConfig has no fsdp field yet")
  plain = planner.estimate(base)
  sharded = planner.estimate(load_config([], "model=tiny mesh=meshes/cpu-8.toml mesh.fsdp=4".split()))
  assert sharded.params < plain.params / 2 and sharded.opt_state < plain.opt_state / 2
  assert "fsdp_gather" in sharded.activations


def test_cli_prints_the_table_and_computed_suggestions(capsys):
  # ~0.11 GiB needed; recomputing each layer brings it under 0.06 GiB.
  rc = planner.main(
    [
      "--model",
      "tiny",
      "--mesh",
      "meshes/cpu-8.toml",
      "--device-memory",
      "0.06",
      "train.batch_size=16",
      "train.seq_len=512",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0
  assert "parameters (master)" in out and "DOES NOT FIT" in out
  # Suggestions carry re-estimated totals, e.g. "recompute each layer (model.remat=full): 0.03 GiB  fits".
  tail = out.split("changes that would help")[1]
  assert any("model.remat=full" in line and "GiB  fits" in line for line in tail.splitlines()), tail


def test_device_memory_table():
  cfg = load_config([], ["mesh=meshes/tpu-v5p-64.toml", "train.batch_size=256"])
  assert planner.device_memory_bytes(cfg.mesh)[0] == 95 * planner.GiB
  assert planner.device_memory_bytes(load_config([], ["mesh=meshes/h100-8.toml"]).mesh)[0] == 80 * planner.GiB
  assert planner.device_memory_bytes(load_config([], ["mesh=meshes/tpu-v5e-8.toml"]).mesh)[0] == 16 * planner.GiB
  assert planner.device_memory_bytes(cfg.mesh, 40.0)[0] == 40 * planner.GiB
