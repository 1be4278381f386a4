"""FSDP (ZeRO-3, mesh.fsdp): parameters, gradients and Adam moments split their model dim over the
outer fsdp ways of dp. Equal to one device (loss and every gradient), alone, with tp, with MoE
folding and inside the pipeline; the per-device parameter + optimizer bytes fall by the fsdp factor;
each layer's weights are gathered inside the layer scan, never the whole stack at once."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_pipeline as tp_

from jaxllm.config import ConfigError, MeshConfig, ModelConfig, TrainConfig
from jaxllm.model import hooks
from jaxllm.model.params import init_params, model_def
from jaxllm.parallel import build_mesh, mesh_hooks
from jaxllm.parallel.sharding import batch_sharding, param_shardings
from jaxllm.train.optim import make_optimizer
from jaxllm.train.state import abstract_state, state_shardings
from jaxllm.train.step import grads_and_metrics, make_train_step

FAST = {"xla_backend_optimization_level": 0}
DENSE = ModelConfig(name="fsdp-dense", vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=128)
MOE = ModelConfig(
  name="fsdp-moe",
  vocab_size=256,
  d_model=64,
  n_layers=2,
  n_heads=8,
  n_kv_heads=2,
  d_ff=128,
  n_experts=8,
  n_experts_per_tok=2,
  moe_d_ff=32,
  shared_expert_d_ff=32,
  shared_expert_gate=True,
)


def _batch(cfg, B=8, T=16):
  tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}


def _assert_equal(grads, metrics, ref_g, ref_m):
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_m["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["aux_loss"]), float(ref_m["aux_loss"]), rtol=1e-6, atol=1e-9)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_g)):
    r = np.asarray(r)
    np.testing.assert_allclose(
      np.asarray(g), r, rtol=1e-5, atol=1e-6 * np.abs(r).max(), err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.parametrize(
  "cfg,mesh_kw",
  [
    pytest.param(DENSE, dict(dp=8, fsdp=8), marks=pytest.mark.slow),  # FSDP alone over all 8 devices
    (DENSE, dict(dp=4, tp=2, fsdp=4)),  # with tensor parallelism
    (MOE, dict(dp=4, tp=2, fsdp=2, ep=4)),  # with MoE folding: fsdp lines up with edp
    pytest.param(MOE, dict(dp=4, tp=2, fsdp=4, ep=2), marks=pytest.mark.slow),  # experts: ep over tp, fsdp over dp
  ],
  ids=["dp8-fsdp8", "dp4-tp2-fsdp4", "fold-ep4-fsdp2", "ep2-fsdp4"],
)
def test_fsdp_matches_single_device(cfg, mesh_kw):
  mdef = model_def(cfg)
  params = jax.jit(init_params, static_argnums=(0, 1))(cfg, 0)
  batch = _batch(cfg)
  ref = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b)).lower(params, batch).compile(FAST)(params, batch)
  mesh, plan = build_mesh(MeshConfig(**mesh_kw))
  fsdp = plan.size("fsdp")
  p = jax.device_put(params, param_shardings(mdef, mesh, plan))
  # The model dim really is split fsdp ways (dense weights; experts too when ep leaves fsdp free).
  assert p["layers"]["wq"].addressable_shards[0].data.shape[1] == cfg.d_model // fsdp
  if cfg.is_moe:  # [L, E, D, F]: the model dim takes the fsdp axes ep does not already split
    free = set(plan.dims["fsdp"]) - set(plan.dims["ep"])
    assert p["layers"]["w_up"].addressable_shards[0].data.shape[2] == cfg.d_model // (fsdp if free else 1)
  hk = mesh_hooks(mesh, plan, cfg)

  def f(p, b):
    with hooks.using(**hk):
      return grads_and_metrics(mdef, p, b)

  compiled = jax.jit(f).lower(p, jax.device_put(batch, batch_sharding(mesh, plan))).compile(FAST)
  _assert_equal(*compiled(p, jax.device_put(batch, batch_sharding(mesh, plan))), *ref)
  # Gathered per layer inside the scan: no all-gather ever holds a whole [L, ...] weight stack.
  stacks = {tuple(a.shape) for a in jax.tree.leaves(mdef.abstract_params()["layers"])}
  for line in compiled.as_text().splitlines():
    m = re.search(r"= f32\[([\d,]+)\][^ ]* all-gather\(", line)
    if m:
      assert tuple(int(x) for x in m.group(1).split(",")) not in stacks, line.strip()[:160]


def _state_bytes(cfg, mesh_kw):
  """(per-device bytes of params + Adam state from the shardings, compiled argument bytes of the train step)."""
  mdef, tx = model_def(cfg), make_optimizer(TrainConfig(), model_def(cfg).logical)
  mesh, plan = build_mesh(MeshConfig(**mesh_kw))
  sh = state_shardings(mdef, tx, mesh, plan)
  st = abstract_state(mdef, tx, sh)
  per_device = sum(int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize for s in jax.tree.leaves(st))
  b_sh = batch_sharding(mesh, plan)
  step = make_train_step(mdef, tx, sh, b_sh, 1, hook_kwargs=mesh_hooks(mesh, plan, cfg))
  b = {k: jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=b_sh) for k in ("inputs", "targets")}
  return per_device, step.lower(st, b).compile(FAST).memory_analysis().argument_size_in_bytes


@pytest.mark.parametrize(
  "cfg,base,fsdp,factor",
  [
    (DENSE, dict(dp=8), dict(dp=8, fsdp=8), 8),
    (DENSE, dict(dp=4, tp=2), dict(dp=4, tp=2, fsdp=4), 4),
    pytest.param(MOE, dict(dp=4, tp=2, ep=4), dict(dp=4, tp=2, ep=4, fsdp=2), 2, marks=pytest.mark.slow),
  ],
  ids=["dp8", "tp2", "fold"],
)
def test_fsdp_bytes_fall_by_the_factor(cfg, base, fsdp, factor):
  """Per-device params + optimizer bytes (the state's shard shapes, and the compiled train step's
  arguments, which add the small token batch) fall by the fsdp factor, to within the few leaves too
  small to split (norm scales of head_dim, the step count)."""
  (state0, args0), (state1, args1) = _state_bytes(cfg, base), _state_bytes(cfg, fsdp)
  assert state0 / state1 == pytest.approx(factor, rel=0.03), (state0, state1)
  assert args0 / args1 == pytest.approx(factor, rel=0.03), (args0, args1)


@pytest.mark.parametrize(
  "schedule,pp,vpp,m,dp,tp,fsdp,remat",
  [
    pytest.param("1f1b", 2, 2, 4, 2, 2, 2, True, marks=pytest.mark.slow),  # with tp inside the stages
    pytest.param("gpipe", 2, 1, 2, 4, 1, 4, True, marks=pytest.mark.slow),
    ("1f1b", 2, 1, 2, 4, 1, 2, False),  # residual stash
  ],
)
def test_fsdp_inside_the_pipeline(schedule, pp, vpp, m, dp, tp, fsdp, remat):
  cfg = tp_.tiny(4)
  mdef, params = model_def(cfg), init_params(cfg, 0)
  batch = tp_.make_batch(2 * m * dp, cfg.vocab_size, seed=3)
  ref = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, batch)
  mesh, plan = build_mesh(MeshConfig(pp=pp, vpp=vpp, dp=dp, tp=tp, fsdp=fsdp, microbatches=m, schedule=schedule))
  grads, metrics, _ = tp_.run_pipeline(mdef, mesh, plan, m, schedule, params, batch, 1, remat)
  tp_.assert_close(grads, metrics, *ref)


@pytest.mark.slow
def test_fsdp_moe_pipeline_with_folding():
  cfg = tp_.tiny(
    4,
    d_model=48,
    n_experts=8,
    n_experts_per_tok=2,
    moe_d_ff=32,
    shared_expert_d_ff=24,
    shared_expert_gate=True,
    aux_loss_coef=0.1,
    z_loss_coef=0.01,
  )
  mdef, params = model_def(cfg), init_params(cfg, 2)
  m = 4
  batch = tp_.make_batch(2 * m * 2, cfg.vocab_size, seed=5)
  ref = tp_.microbatch_reference(mdef, params, batch, m)
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=2, dp=2, tp=2, fsdp=2, ep=2, microbatches=m))
  assert plan.dims["fsdp"] == plan.dims["edp"]  # experts are split by fsdp too
  grads, metrics, _ = tp_.run_pipeline(mdef, mesh, plan, m, "1f1b", params, batch)
  tp_.assert_close(grads, metrics, *ref)


def test_fsdp_must_divide_dp():
  with pytest.raises(ConfigError, match=r"mesh.fsdp=3 must divide mesh.dp=4.*\[1, 2, 4\]"):
    MeshConfig(dp=4, fsdp=3)
