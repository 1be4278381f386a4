"""Training: sharded == single device, grad accumulation, learning, kill-and-resume, NaN stop,
checkpoints across meshes, and clear errors for broken checkpoint directories."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import Config, MeshConfig, ModelConfig, TrainConfig, load_config
from jaxllm.io.checkpoint import load_params
from jaxllm.model import hooks
from jaxllm.model.params import init_params, model_def
from jaxllm.parallel import build_mesh, mesh_hooks
from jaxllm.parallel.sharding import batch_sharding, param_shardings
from jaxllm.train.checkpoint import Checkpointer, CheckpointError
from jaxllm.train.loop import train
from jaxllm.train.optim import make_optimizer
from jaxllm.train.runner import TrainingDiverged
from jaxllm.train.state import abstract_state, init_state, state_shardings
from jaxllm.train.step import grads_and_metrics, make_train_step

SMALL = ModelConfig(name="t", vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


def _batch(B=8, T=16, V=259, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32) for k in ("inputs", "targets")}


def sharded_grads(cfg, mesh_cfg, params, batch):
  """Loss gradients and metrics of `batch` on a mesh (params and batch placed by the rules)."""
  mesh, plan = build_mesh(mesh_cfg)
  mdef = model_def(cfg)
  p = jax.device_put(params, param_shardings(mdef, mesh, plan))
  b = jax.device_put(batch, batch_sharding(mesh, plan))

  def f(p, b):
    with hooks.using(**mesh_hooks(mesh, plan, cfg)):
      return grads_and_metrics(mdef, p, b)

  return jax.jit(f)(p, b)


@pytest.mark.parametrize("dp,tp,moe", [(4, 2, False), (2, 4, False), (8, 1, False), (1, 8, False), (4, 2, True)])
def test_sharded_loss_and_grads_equal_single_device(dp, tp, moe):
  cfg = dataclasses.replace(SMALL, n_experts=4, moe_d_ff=32) if moe else SMALL
  params, batch = init_params(cfg, 0), _batch()
  mdef = model_def(cfg)
  ref_g, ref_m = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, batch)
  g, m = sharded_grads(cfg, MeshConfig(dp=dp, tp=tp), params, batch)
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, ref_g)
  # attention weights really are split over tp (heads=4 divisible by tp<=4)
  if 1 < tp <= 4:
    mesh, plan = build_mesh(MeshConfig(dp=dp, tp=tp))
    spec = param_shardings(mdef, mesh, plan)["layers"]["wq"].spec
    assert spec[2] is not None and spec[1] is None


def test_grad_accumulation_equals_full_batch_with_uneven_masks():
  """Chunks with very different numbers of counted tokens: the accumulated loss and gradients equal
  the full batch's (token-sum / global count), and differ clearly from the biased mean of chunk means."""
  mdef, params, batch = model_def(SMALL), init_params(SMALL, 0), _batch()
  rng = np.random.default_rng(1)
  # Strided chunks: row i goes to chunk i % 4. Chunk 0 keeps 1-2 tokens per row, chunk 3 all of them.
  keep = np.array([0.05, 0.3, 0.6, 1.0])[np.arange(8) % 4]
  batch["mask"] = jnp.asarray(rng.random((8, 16)) < keep[:, None], jnp.int32)
  g1, m1 = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b, 1))(params, batch)
  g4, m4 = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b, 4))(params, batch)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  assert float(m4["tokens"]) == float(batch["mask"].sum())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g4)
  # The mean of the four chunk means (what averaging per-chunk losses gives) is a different number.
  chunk_means = [
    float(grads_and_metrics(mdef, params, jax.tree.map(lambda x: x[c::4], batch))[1]["loss"]) for c in range(4)
  ]
  assert abs(np.mean(chunk_means) - float(m1["loss"])) > 1e-3


def test_nonfinite_step_is_not_applied():
  cfg = Config(model=SMALL, mesh=MeshConfig(), train=TrainConfig(batch_size=8))
  mdef = model_def(SMALL)
  tx = make_optimizer(cfg.train, mdef.logical)
  mesh, plan = build_mesh(cfg.mesh, jax.devices()[:1])
  sh = state_shardings(mdef, tx, mesh, plan)
  state = init_state(mdef, tx, sh, 0)
  bad = jax.tree.map(lambda x: x, state)._replace(
    params={**state.params, "final_norm": state.params["final_norm"] * jnp.nan}
  )
  before = jax.tree.map(np.asarray, bad.params)
  step = make_train_step(mdef, tx, sh, batch_sharding(mesh, plan))
  new, metrics = step(bad, _batch())
  assert not bool(metrics["finite"]) and int(new.step) == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.tree.map(np.asarray, new.params), before)


def _cfg(tmp_path, *extra):
  return load_config(
    [],
    [
      f"mesh={os.path.join(os.path.dirname(__file__), '..', '..', 'meshes', 'cpu-8.toml')}",
      "model=tiny",
      "model.n_layers=2",
      "model.d_model=64",
      "model.d_ff=128",
      "train.seq_len=64",
      "train.batch_size=8",
      "train.max_corpus_bytes=300000",
      "train.warmup_steps=5",
      "train.lr=3e-3",
      "train.eval_every=0",
      "train.sample_tokens=0",
      "train.log_every=5",
      f"train.out_dir={tmp_path}",
      *extra,
    ],
  )


def test_training_lowers_loss_and_resume_matches(tmp_path):
  full = train(_cfg(tmp_path / "full", "train.steps=24", "train.save_every=8"), progress=False, log=lambda *_: None)
  assert full["last_loss"] < full["first_loss"] - 0.8, full
  # Kill after 13 steps (checkpoint at 8), then run again: it resumes at 8 and replays 9..24.
  part = _cfg(tmp_path / "part", "train.steps=24", "train.save_every=8")
  first = train(part, stop_after=13, progress=False, log=lambda *_: None)
  assert first["steps"] == 13
  second = train(part, progress=False, log=lambda *_: None)
  assert second["history"][0]["step"] == 9
  want = {h["step"]: h["loss"] for h in full["history"]}
  for h in first["history"] + second["history"]:
    assert h["loss"] == pytest.approx(want[h["step"]], rel=1e-5), h
  lines = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert lines[-1]["step"] == 24 and "mfu" in lines[-1] and "tokens_per_s" in lines[-1]
  saved = json.load(open(tmp_path / "full" / "config.json"))
  assert saved["train"]["steps"] == 24


def test_divergence_stops_and_keeps_last_checkpoint(tmp_path):
  cfg = _cfg(
    tmp_path,
    "train.steps=30",
    "train.save_every=1",
    "train.lr=1e30",
    "train.warmup_steps=0",
    "train.grad_clip=0",
    "train.weight_decay=0",
  )
  with pytest.raises(TrainingDiverged, match="NaN/inf at step") as e:
    train(cfg, progress=False, log=lambda *_: None)
  ck = Checkpointer(tmp_path / "checkpoints")
  last = ck.latest_step()
  assert last is not None and f"(step {last})" in str(e.value)
  ck.close()
  config, params = load_params(str(tmp_path / "checkpoints"))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_checkpoint_restores_on_other_meshes_and_reports_damage(tmp_path):
  cfg = Config(model=SMALL, mesh=MeshConfig(dp=4, tp=2), train=TrainConfig(batch_size=8))
  mdef = model_def(SMALL)
  tx = make_optimizer(cfg.train, mdef.logical)
  mesh, plan = build_mesh(cfg.mesh)
  state = init_state(mdef, tx, state_shardings(mdef, tx, mesh, plan), 0)
  ck = Checkpointer(tmp_path / "ck")
  ck.save(3, state, {"epoch": 0, "index": 1}, cfg)
  ck.wait()
  want = jax.tree.map(np.asarray, state.params)
  for target, devs in ((MeshConfig(), jax.devices()[:1]), (MeshConfig(dp=2, tp=4), None)):
    m2, p2 = build_mesh(target, devs)
    params, opt, meta = ck.restore(abstract_state(mdef, tx, state_shardings(mdef, tx, m2, p2)))
    assert meta["step"] == 3 and meta["data"] == {"epoch": 0, "index": 1}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, want)
    assert len(params["layers"]["wq"].sharding.device_set) == len(m2.devices.flat)
  ck.close()
  with pytest.raises(CheckpointError, match="does not exist"):
    load_params(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="no finished checkpoint"):
    load_params(str(tmp_path / "empty"))
  # Damage the array data of step 3: restore must say which step and leave the files in place.
  files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "ck" / "3" / "params") for f in fs]
  for f in files:
    if os.path.getsize(f) > 1000:
      with open(f, "r+b") as fh:
        fh.truncate(100)
  ck = Checkpointer(tmp_path / "ck")
  with pytest.raises(CheckpointError, match="step 3"):
    ck.restore(abstract_state(mdef, tx, state_shardings(mdef, tx, mesh, plan)))
  assert all(os.path.exists(f) for f in files)
  ck.close()


def _lrs(path):
  return {r["step"]: r["lr"] for r in map(json.loads, open(path))}


def test_continuing_a_finished_run_keeps_the_lr_schedule(tmp_path):
  """Run 6 steps, then raise train.steps to 10 and run again: the horizon (decay_steps=6) is saved
  with the run, so steps 1-6 follow it and 7-10 stay at the floor lr: no jump."""
  base = ("train.warmup_steps=2", "train.lr=1e-2", "train.min_lr_ratio=0.1", "train.save_every=0")
  first = train(_cfg(tmp_path, "train.steps=6", *base), progress=False, log=lambda *_: None)
  assert first["steps"] == 6
  second = train(_cfg(tmp_path, "train.steps=10", *base), progress=False, log=lambda *_: None)
  assert second["history"][0]["step"] == 7
  lrs = _lrs(tmp_path / "metrics.jsonl")
  assert sorted(lrs) == list(range(1, 11))
  from jaxllm.train.optim import lr_schedule

  sched = lr_schedule(TrainConfig(steps=6, decay_steps=6, warmup_steps=2, lr=1e-2, min_lr_ratio=0.1))
  for s in range(1, 7):
    assert lrs[s] == pytest.approx(float(sched(s - 1)))
  for s in range(7, 11):
    assert lrs[s] == pytest.approx(1e-3)
  assert json.load(open(tmp_path / "config.json"))["train"]["decay_steps"] == 6


def test_pipelined_run_end_to_end(tmp_path):
  """train() on the pp=2 x vpp=2 (dp=2 tp=2) mesh, 1F1B: train, eval through the pipeline, save, kill,
  resume, and the sample from the serving engine; the loss curve and eval loss equal those of the
  non-pipelined cpu-8 mesh (dp=4 x tp=2) on the same batches."""
  from jaxllm.serve import complete_text

  pp_mesh = os.path.join(os.path.dirname(__file__), "..", "..", "meshes", "cpu-8-pp.toml")
  common = (
    "model.n_layers=4",
    "train.steps=4",
    "train.save_every=2",
    "train.eval_every=2",
    "train.eval_batches=2",
    "train.sample_tokens=6",
  )
  ref = train(_cfg(tmp_path / "ref", *common), progress=False, log=lambda *_: None)
  cfg = _cfg(tmp_path / "pp", *common, f"mesh={pp_mesh}")
  lines = []
  first = train(cfg, stop_after=3, progress=False, log=lines.append)
  assert first["steps"] == 3 and any("pipeline 1f1b pp=2 vpp=2 m=4" in l for l in lines)
  second = train(cfg, progress=False, log=lines.append, sampler=complete_text)
  assert second["history"][0]["step"] == 3  # resumed from the step-2 checkpoint
  want = {h["step"]: h["loss"] for h in ref["history"]}
  for h in first["history"] + second["history"]:
    assert h["loss"] == pytest.approx(want[h["step"]], rel=2e-5), h
  assert second["eval_loss"] == pytest.approx(ref["eval_loss"], rel=2e-5)
  assert second["sample"].startswith(cfg.train.sample_prompt) and len(second["sample"]) > len(cfg.train.sample_prompt)
  config, params = load_params(str(tmp_path / "pp" / "checkpoints"))  # canonical: loads on one device
  assert config.mesh.pp == 2 and params["layers"]["wq"].shape[0] == 4
