"""Circular pipeline (PP x vPP) == the non-pipelined model, on the 8-device CPU mesh in fp32.

Tolerances (fp32, matmul precision 'highest'): loss |diff| <= 1e-5 * |loss|; every gradient leaf
max|diff| <= 5e-5 * max|reference| (observed ~1e-6: only the summation order differs).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.config import Config, ConfigError, MeshConfig, ModelConfig, TrainConfig, check_pipeline
from jaxllm.model.loss import cross_entropy
from jaxllm.model.params import init_params, model_def
from jaxllm.model.transformer import aux_loss
from jaxllm.parallel import pipeline as pl
from jaxllm.parallel.mesh import build_mesh
from jaxllm.parallel.sharding import batch_sharding, param_shardings
from jaxllm.train.metrics import compiled_temp_bytes
from jaxllm.train.step import grads_and_metrics, pipelined

SEQ = 16


def tiny(n_layers, **kw):
  base = dict(vocab_size=128, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=128)
  return ModelConfig(**{**base, **kw})


def make_batch(B, vocab, seed=0, mask=False):
  rng = np.random.default_rng(seed)
  batch = {"inputs": jnp.asarray(rng.integers(0, vocab, (B, SEQ)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, vocab, (B, SEQ)), jnp.int32)}
  if mask:
    batch["mask"] = jnp.asarray(rng.random((B, SEQ)) > 0.3, jnp.int32)
  return batch


def assert_close(grads, metrics, ref_grads, ref_metrics):
  for k in ("loss", "aux_loss"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref = np.asarray(flat_ref[path])
    err = np.max(np.abs(np.asarray(g) - ref))
    assert err <= 5e-5 * np.max(np.abs(ref)) + 1e-9, (jax.tree_util.keystr(path), err, np.max(np.abs(ref)))


def pipeline_grads_fn(mdef, mesh, plan, m, grad_accum=1, remat=True):
  fwd = pipelined(mdef, mesh, plan, m, remat=remat)
  return lambda p, b: grads_and_metrics(mdef, p, b, grad_accum, forward=fwd)


def run_pipeline(mdef, mesh, plan, m, params, batch, grad_accum=1, remat=True):
  """Jit with canonical params split over the stage axis (param_shardings on a pp mesh); returns
  (grads, metrics, compiled)."""
  fn = pipeline_grads_fn(mdef, mesh, plan, m, grad_accum, remat)
  p_sh = param_shardings(mdef, mesh, plan)
  b_sh = NamedSharding(mesh, P(plan.dims["dp"] or None))
  with jax.set_mesh(mesh):
    compiled = jax.jit(fn, in_shardings=(p_sh, b_sh), out_shardings=(p_sh, None)).lower(params, batch).compile()
    grads, metrics = compiled(jax.device_put(params, p_sh), jax.device_put(batch, b_sh))
  return grads, metrics, compiled


# (pp, vpp, m, dp, tp, grad_accum, remat): the grid, filling the 8 devices with dp/tp inside
# each stage. All cases share one 8-layer model and one batch, so the single-device reference runs once.
GRID = [(2, 1, 2, 4, 1, 2, True), (2, 2, 4, 2, 2, 1, True), (4, 2, 8, 2, 1, 1, True), (2, 4, 4, 1, 4, 1, True),
        (4, 1, 8, 1, 2, 1, False), (8, 1, 8, 1, 1, 1, True)]


@pytest.fixture(scope="module")
def dense_case():
  cfg = tiny(8)
  mdef, params = model_def(cfg), init_params(cfg, 0)
  batch = make_batch(16, cfg.vocab_size, seed=1)
  ref = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, batch)
  return mdef, params, batch, ref


@pytest.mark.parametrize("pp,vpp,m,dp,tp,grad_accum,remat", GRID)
def test_pipeline_matches_sequential(dense_case, pp, vpp, m, dp, tp, grad_accum, remat):
  """grad_accum=2 (no mask) averages two equal halves, so it equals the full-batch reference too."""
  mdef, params, batch, (ref_grads, ref_metrics) = dense_case
  mesh, plan = build_mesh(MeshConfig(pp=pp, vpp=vpp, dp=dp, tp=tp, microbatches=m))
  grads, metrics, compiled = run_pipeline(mdef, mesh, plan, m, params, batch, grad_accum, remat)
  assert_close(grads, metrics, ref_grads, ref_metrics)
  if (pp, vpp) in ((2, 1), (2, 2)):
    check_hlo(compiled.as_text(), mesh)


def test_uneven_masks_pipelined_equals_accumulated_equals_full(dense_case):
  """Masks that leave very different token counts per microbatch and per accumulation chunk: the
  pipelined step (m=4, grad_accum=2), the accumulated single-device step and the full batch agree
  (token-loss sums divided once by the step's token count), loss and every gradient."""
  mdef, params, batch, _ = dense_case
  rng = np.random.default_rng(3)
  keep = np.array([0.05, 0.2, 0.5, 0.8, 1.0, 0.1, 0.9, 0.3])[np.arange(16) % 8]
  batch = {**batch, "mask": jnp.asarray(rng.random((16, SEQ)) < keep[:, None], jnp.int32)}
  full = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, batch)
  accum = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b, 4))(params, batch)
  assert_close(*accum, *full)
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=2, dp=2, tp=2, microbatches=4))
  grads, metrics, _ = run_pipeline(mdef, mesh, plan, 4, params, batch, grad_accum=2)
  assert_close(grads, metrics, *full)


def check_hlo(hlo: str, mesh):
  """Stage-to-stage traffic is a collective-permute between devices that differ only in their
  stage coordinate; no all-gather anywhere (stage weights stay on their stage)."""
  coord = {int(d.id): c for c, d in np.ndenumerate(mesh.devices)}
  permutes = [l for l in hlo.splitlines() if re.search(r"collective-permute(-start)?\(", l) and "ppermute" in l]
  assert len(permutes) >= 2, "no collective-permute from the pipeline's ppermute (forward and backward)"
  for line in permutes:
    pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[1].split("}}")[0] + "}")
    assert pairs
    for a, b in pairs:
      ca, cb = coord[int(a)], coord[int(b)]
      assert ca[1:] == cb[1:] and ca[0] != cb[0], f"permute {a}->{b} is not along the stage axis"
  gathers = [l.strip()[:200] for l in hlo.splitlines() if re.search(r"all-gather(-start)?\(", l)]
  assert not gathers, f"all-gather in the pipelined step: {gathers[:3]}"


def test_pipeline_with_moe_folding():
  """pp=2 with ep=4 folded over dp=2 x tp=2 in each stage; the experts run the local dropless path
  (GSPMD-partitioned inside the stage). Aux losses are per microbatch (as Megatron under PP), so
  the reference is CE over the whole batch + the mean over microbatches of the model's aux loss."""
  pp, vpp, m = 2, 2, 4
  cfg = tiny(4, n_experts=8, n_experts_per_tok=2, moe_d_ff=32, shared_expert_d_ff=32, shared_expert_gate=True,
             aux_loss_coef=0.1, z_loss_coef=0.01)
  mdef, params = model_def(cfg), init_params(cfg, 2)
  batch = make_batch(8, cfg.vocab_size, seed=5, mask=True)

  def ref_loss(p, b):
    # One model pass per microbatch: masked CE summed over the whole batch, aux averaged.
    model = mdef.bind(p)

    def one(mb):
      out = model(mb["inputs"])
      count = jnp.sum(mb["mask"])
      return cross_entropy(out.logits, mb["targets"], mb["mask"]) * count, aux_loss(cfg, out.aux)
    nll, aux = jax.lax.map(one, jax.tree.map(lambda x: pl.split_microbatches(x, m), b))
    ce, aux = jnp.sum(nll) / jnp.sum(b["mask"]), jnp.mean(aux)
    return ce + aux, {"loss": ce, "aux_loss": aux}
  (_, ref_metrics), ref_grads = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(params, batch)
  mesh, plan = build_mesh(MeshConfig(pp=pp, vpp=vpp, dp=2, tp=2, ep=4, microbatches=m))
  assert plan.size("ep") == 4
  grads, metrics, _ = run_pipeline(mdef, mesh, plan, m, params, batch)
  assert float(metrics["aux_loss"]) > 0
  assert_close(grads, metrics, ref_grads, ref_metrics)


def test_remat_bounds_memory_growth():
  """Temp memory from m=pp to m=8pp (fixed microbatch size): with the tick-input remat policy it
  grows far slower than storing every layer's intermediates."""
  pp, vpp = 2, 2
  cfg = tiny(4, vocab_size=64, d_ff=256)
  mdef = model_def(cfg)
  mesh, plan = build_mesh(MeshConfig(pp=pp, vpp=vpp, dp=4, microbatches=pp))
  growth = {}
  p_sh, b_sh = param_shardings(mdef, mesh, plan), batch_sharding(mesh, plan)

  def temp(m, remat):
    tokens = jax.ShapeDtypeStruct((m * 4, SEQ * 2), jnp.int32)
    with jax.set_mesh(mesh):
      fn = jax.jit(pipeline_grads_fn(mdef, mesh, plan, m, remat=remat), in_shardings=(p_sh, b_sh),
                   out_shardings=(p_sh, None))
      return compiled_temp_bytes(fn, mdef.abstract_params(), {"inputs": tokens, "targets": tokens})
  for remat in (True, False):
    temps = [temp(m, remat) for m in (pp, 8 * pp)]
    growth[remat] = temps[1] - temps[0]
  assert growth[True] * 3 < growth[False], growth


def test_layout_round_trip_and_placement():
  cfg = tiny(8)
  params = init_params(cfg, 0)["layers"]
  for pp, vpp in ((2, 2), (4, 2), (2, 4), (8, 1)):
    staged = pl.to_pipeline_layout(params, pp, vpp)
    C = 8 // (pp * vpp)
    assert staged["wq"].shape == (vpp, pp, C) + params["wq"].shape[1:]
    back = pl.from_pipeline_layout(staged)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    for layer in range(8):
      r, s, c = pl.stage_of_layer(layer, 8, pp, vpp)
      assert s == (layer // C) % pp and r == layer // (C * pp)   # Megatron placement
      np.testing.assert_array_equal(staged["wq"][r, s, c], params["wq"][layer])


def test_schedule_and_validation():
  info = pl.schedule_info(4, 2, 8)
  assert info["ticks"] == 8 * 2 + 3 and info["valid_slots"] == 64 and info["slots"] == 76
  assert info["bubble"] == pytest.approx(3 / 19) and info["bubble_no_vpp"] == pytest.approx(3 / 11)
  assert "19 ticks" in pl.format_schedule(4, 2, 8)
  with pytest.raises(ConfigError, match="divisible by mesh.pp\\*mesh.vpp"):
    check_pipeline(2, 2, 4, n_layers=6)
  with pytest.raises(ConfigError, match="must be >= mesh.pp"):
    check_pipeline(4, 1, 2, n_layers=8)
  with pytest.raises(ConfigError, match="mesh.vpp=2 needs mesh.pp > 1"):
    MeshConfig(vpp=2, dp=8)
  with pytest.raises(ConfigError, match="train.grad_accum=4"):
    MeshConfig(dp=8, microbatches=4)
  with pytest.raises(ConfigError, match="must be >= mesh.pp"):
    MeshConfig(pp=4, dp=2, microbatches=2)
  with pytest.raises(ConfigError, match="divisible by mesh.pp\\*mesh.vpp"):
    Config(model=tiny(6), mesh=MeshConfig(pp=2, vpp=2, dp=4, microbatches=4), train=TrainConfig(batch_size=16))
  mdef = model_def(tiny(6))
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=2, dp=4, microbatches=4))
  batch = make_batch(8, 128)
  with pytest.raises(ConfigError, match="divisible"):
    jax.eval_shape(pipeline_grads_fn(mdef, mesh, plan, 4), mdef.abstract_params(), batch)
  mdef = model_def(tiny(4))
  with pytest.raises(ConfigError, match="does not split into 4 microbatches"):
    jax.eval_shape(pipeline_grads_fn(mdef, mesh, plan, 4), mdef.abstract_params(), make_batch(6, 128))


def test_checkpoint_moves_between_pipeline_and_single_device(tmp_path):
  """Params stay canonical [L, ...]: saved from a pp=2 vpp=2 run (layer stack split over stages),
  they restore on one device unchanged, and a single-device save restores onto the pipeline mesh."""
  import orbax.checkpoint as ocp
  cfg = tiny(4)
  mdef, params = model_def(cfg), init_params(cfg, 4)
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=2, dp=4, microbatches=4))
  p_sh = param_shardings(mdef, mesh, plan)
  assert p_sh["layers"]["wq"].spec[0] == "pp"
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "pp2", jax.device_put(params, p_sh))
  ckpt.wait_until_finished()
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), params)
  restored = ckpt.restore(tmp_path / "pp2", target)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  ckpt.save(tmp_path / "single", jax.device_put(params, one))
  ckpt.wait_until_finished()
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, p_sh)
  restored = ckpt.restore(tmp_path / "single", target)
  assert restored["layers"]["wq"].sharding.spec == p_sh["layers"]["wq"].spec
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_train_step_integration():
  """make_train_step(forward=pipelined) on a pp mesh's state_shardings == the single-device step."""
  import optax
  from jaxllm.parallel import mesh_hooks
  from jaxllm.train.state import state_shardings
  from jaxllm.train.step import TrainState, make_train_step
  cfg = tiny(4)
  mdef, params = model_def(cfg), init_params(cfg, 6)
  tx = optax.sgd(0.5)
  batch = make_batch(8, cfg.vocab_size, seed=7)
  state = TrainState(params, tx.init(params), jnp.int32(0))
  ref_state, ref_metrics = make_train_step(mdef, tx)(jax.tree.map(jnp.copy, state), batch)  # donates
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=2, dp=4, microbatches=2))
  sh = state_shardings(mdef, tx, mesh, plan)
  b_sh = NamedSharding(mesh, P(plan.dims["dp"]))
  with jax.set_mesh(mesh):
    step = make_train_step(mdef, tx, sh, b_sh, hook_kwargs=mesh_hooks(mesh, plan, cfg),
                           forward=pipelined(mdef, mesh, plan, 2))
    new, metrics = step(jax.device_put(state, sh), jax.device_put(batch, b_sh))
  assert new.params["layers"]["wq"].sharding.spec[0] == "pp"
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new.params, ref_state.params)
