"""The one run loop (jaxllm.train.runner) on a counting task with no model: checkpoint cadence, resume
after a kill, the divergence guard, metrics lines, and files written by process 0 only. The three real
trainers on it are tested end to end in test_train.py, test_rl_loop.py and test_reward_model.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import load_config
from jaxllm.train import runner
from jaxllm.train.runner import Task, TrainingDiverged, run
from jaxllm.train.step import TrainState


class Counting(Task):
  """state.params["w"] counts the steps; step `nan_at` reports a non-finite update."""

  name = "count"

  def __init__(self, out, steps=5, nan_at=None, **train):
    extra = [f"train.{k}={v}" for k, v in train.items()]
    self.cfg = load_config(
      [], [f"train.out_dir={out}", f"train.steps={steps}", "train.save_every=2", "train.log_every=1", *extra]
    )
    self.nan_at, self.closed, self.data = nan_at, False, []

  def init(self, ckpt, start, log):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    z = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=one)
    if start is None:
      return TrainState({"w": jnp.zeros(2)}, {"m": jnp.zeros(2)}, jnp.int32(0))
    params, opt, meta = ckpt.restore(TrainState({"w": z}, {"m": z}, None), start)
    self.data.append(meta["data"])
    return TrainState(params, opt, jnp.int32(meta["step"]))

  def step(self, state, step):
    w = state.params["w"] + 1
    return state._replace(params={"w": w}), {"finite": step + 1 != self.nan_at, "loss": float(w[0])}

  def eval_due(self, step):
    return step % 2 == 0

  def evaluate(self, state, step):
    return state, {"eval_loss": -float(step)}

  def checkpoint(self, state, step):
    return state, {"position": step}

  def close(self):
    self.closed = True


def lines(out):
  return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_cadence_metrics_and_resume_after_a_kill(tmp_path):
  logs = []
  first = Counting(tmp_path)
  res = run(first, progress=False, log=logs.append, stop_after=3)
  assert (res.first, res.step, first.closed) == (0, 3, True)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # no final save after a kill
  assert any(line.startswith("step      3") for line in logs)
  again = Counting(tmp_path)
  res = run(again, progress=False, log=logs.append)
  assert res.resumed and (res.first, res.step) == (2, 5) and again.data == [{"position": 2}]
  assert [h["step"] for h in res.history] == [3, 4, 5] and res.history[-1]["loss"] == 5.0
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "5"]
  got = lines(tmp_path)
  assert [line["step"] for line in got] == [1, 2, 3, 4, 5]  # the killed run's step 3 written once
  assert [line["step"] for line in got if "eval_loss" in line] == [2, 4]
  assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 5
  done = run(Counting(tmp_path), progress=False, log=logs.append)  # nothing left to do
  assert (done.step, done.history) == (5, [])


def test_divergence_stops_with_the_last_checkpoint_kept(tmp_path):
  task = Counting(tmp_path, steps=9, nan_at=4)
  with pytest.raises(TrainingDiverged, match=r"NaN/inf at step 4 \(loss=4.0\); .* \(step 2\) is kept") as e:
    run(task, progress=False, log=lambda *_: None)
  assert task.closed and sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert "Lower train.lr" in str(e.value)
  assert [line["step"] for line in lines(tmp_path)] == [1, 2, 3]


def test_only_process_0_writes_files_and_logs(tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "is_main_process", lambda: False)
  logs = []
  res = run(Counting(tmp_path), progress=False, log=logs.append)
  assert res.step == 5 and logs == []
  assert sorted(os.listdir(tmp_path)) == ["checkpoints"]  # checkpoints: written by all processes
  state = res.state
  np.testing.assert_array_equal(np.asarray(state.params["w"]), [5, 5])
