"""Multi-host training on JAX's multi-controller runtime, emulated on loopback: 2 processes x 4 CPU
devices form the cpu-8 mesh (dp=4 tp=2). Each process loads only its half of every batch, yet the
losses equal the single-process 8-device run's, and checkpoints resume across process counts
(2x4 -> 1x8 and 1x8 -> 2x4)."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from jaxllm.config import load_config
from jaxllm.data import PackedBatches, eval_batches
from jaxllm.parallel.distributed import DistributedError, local_rows, resolve
from jaxllm.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESH = os.path.join(ROOT, "meshes", "cpu-8.toml")
# Tiny and short; decay_steps fixed so a 3-step run and its resumption follow one LR schedule.
ARGS = [
  "model=tiny",
  "model.n_layers=2",
  "model.d_model=64",
  "model.d_ff=128",
  "train.seq_len=32",
  "train.batch_size=8",
  "train.max_corpus_bytes=60000",
  "train.warmup_steps=2",
  "train.lr=3e-3",
  "train.decay_steps=6",
  "train.eval_every=3",
  "train.eval_batches=1",
  "train.sample_tokens=0",
  "train.log_every=1",
  "train.save_every=3",
]
TIMEOUT = 240


def _cfg(out, steps):
  return load_config([], [f"mesh={MESH}", *ARGS, f"train.steps={steps}", f"train.out_dir={out}"])


def _losses(out):
  return {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(out, steps, use_env=False, extra=(), argv=None):
  """train.py in 2 processes x 4 CPU devices on loopback; -> (output of process 0, of process 1).
  If one fails the other is killed at once (it would wait for its peer), and both past TIMEOUT.
  `argv`: the command's arguments instead of the pretraining run's ARGS, steps and out."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLLM_")}
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
  )
  env.update(
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
    JAX_DEFAULT_MATMUL_PRECISION="highest",
    PYTHONPATH=ROOT,
  )
  procs, logs = [], [tempfile.TemporaryFile("w+") for _ in range(2)]
  try:
    for i in range(2):
      cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *(argv or ["--no-progress", "--mesh", MESH, *ARGS, f"train.steps={steps}", f"train.out_dir={out}", *extra]),
      ]
      penv = dict(env)
      if use_env:
        penv.update(JAXLLM_COORDINATOR=f"127.0.0.1:{port}", JAXLLM_NUM_PROCESSES="2", JAXLLM_PROCESS_ID=str(i))
      else:
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
      procs.append(subprocess.Popen(cmd, env=penv, cwd=ROOT, stdout=logs[i], stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in procs):
      if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = []
  for f in logs:
    f.seek(0)
    outs.append(f.read())
    f.close()
  for i, (p, o) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, (
      f"process {i} exited {p.returncode} (-9: killed, its peer failed or timeout):\n{o[-4000:]}"
    )
  return outs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted single-process 8-device run: 6 steps."""
  out = tmp_path_factory.mktemp("ref")
  train(_cfg(out, 6), progress=False, log=lambda *_: None)
  return _losses(out)


def _assert_same(got, want, steps):
  for s in steps:
    assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5), (s, got[s], want[s])
    if "eval_loss" in want[s]:
      assert got[s]["eval_loss"] == pytest.approx(want[s]["eval_loss"], rel=1e-5), (s, got[s], want[s])


def test_two_processes_equal_one_and_resume_on_one(tmp_path, reference):
  """(a) 2 processes x 4 devices, 3 steps: the same losses (and eval loss) as the 1 x 8 run; only
  process 0 prints. (b) that checkpoint resumed by 1 process x 8: steps 4-6 equal the uninterrupted run."""
  out = tmp_path / "two"
  p0, p1 = _run_two_processes(out, 3)
  got = _losses(out)
  assert sorted(got) == [1, 2, 3]
  _assert_same(got, reference, [1, 2, 3])
  assert "trained to step 3" in p0 and "mesh cpu-8" in p0
  assert "trained to step 3" not in p1 and "mesh cpu-8" not in p1 and "step      1" not in p1
  assert json.load(open(out / "config.json"))["train"]["steps"] == 3
  resumed = train(_cfg(out, 6), progress=False, log=lambda *_: None)
  assert resumed["history"][0]["step"] == 4
  _assert_same(_losses(out), reference, [4, 5, 6])


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two(tmp_path, reference):
  """(c) a 1 x 8 checkpoint at step 3 resumed by 2 processes x 4 (configured through JAXLLM_*
  variables this time): steps 4-6 equal the uninterrupted run; the end-of-run sample through the
  serving engine, on the mesh spanning both processes, equals the one a single process draws."""
  from jaxllm.serve import complete_text

  out = tmp_path / "one"
  train(_cfg(out, 3), progress=False, log=lambda *_: None)
  p0, p1 = _run_two_processes(out, 6, use_env=True, extra=["train.sample_tokens=8"])
  assert "resumed from" in p0 and "trained to step 6" in p0 and "sample:" not in p1
  got = _losses(out)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  _assert_same(got, reference, [1, 2, 3, 4, 5, 6])
  # Step 6 is done: this single-process call only loads the checkpoint and samples.
  one = train(
    load_config([], [f"mesh={MESH}", *ARGS, "train.steps=6", f"train.out_dir={out}", "train.sample_tokens=8"]),
    progress=False,
    log=lambda *_: None,
    sampler=complete_text,
  )
  assert one["sample"] and f"sample:\n{'-' * 60}\n{one['sample']}\n{'-' * 60}" in p0


def test_two_process_reward_model_equals_one_and_writes_from_process_0_only(tmp_path):
  """`train.py reward` on 2 processes x 4 devices: the losses of the single-process run; metrics.jsonl
  holds each step once and process 1 prints nothing (the runner keeps files and logs to process 0)."""
  from jaxllm.data.tasks import AdditionTask
  from jaxllm.rl.reward_model import train_reward_model

  data = AdditionTask(digits_min=1, digits_max=2).write_preference_file(
    str(tmp_path / "pairs.jsonl"), 400, "train", mistakes=("typo",)
  )
  args = [
    "model=tiny",
    "model.n_layers=2",
    "model.d_model=64",
    "model.d_ff=128",
    "train.seq_len=32",
    "train.batch_size=16",
    "train.steps=4",
    "train.eval_every=2",
    "train.save_every=2",
    "train.log_every=1",
  ]
  one = train_reward_model(
    load_config([], [f"mesh={MESH}", *args, f"reward.data={data}", f"train.out_dir={tmp_path / 'one'}"]),
    progress=False,
    log=lambda *_: None,
  )
  p0, p1 = _run_two_processes(
    None,
    None,
    argv=["reward", "--data", data, "--no-progress", "--mesh", MESH, *args, f"train.out_dir={tmp_path / 'two'}"],
  )
  got = _losses(tmp_path / "two")
  assert sorted(got) == [1, 2, 3, 4] and len(open(tmp_path / "two" / "metrics.jsonl").readlines()) == 4
  for h in one["history"]:
    assert got[h["step"]]["loss"] == pytest.approx(h["loss"], rel=1e-5), (h, got[h["step"]])
  assert "reward model to step 4" in p0 and "step      4" in p0
  # (the collective library's own "connected to N peer ranks" lines may interleave; nothing of ours)
  assert not [line for line in p1.splitlines() if line.strip() and "peer ranks" not in line], p1
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]


def test_process_rows_rebuild_the_global_batch():
  """Each process's rows (from the batch sharding) of PackedBatches / eval_batches, put together,
  are the single-process batches, and the position stays global."""
  tokens = np.arange(5000) % 251
  full = PackedBatches(tokens, 16, 8, seed=3)
  parts = [PackedBatches(tokens, 16, 8, seed=3, rows=r) for r in (np.arange(0, 4), np.arange(4, 8))]
  for _ in range(50):  # crosses epoch boundaries (38 windows per epoch)
    want, got = next(full), [next(p) for p in parts]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
  assert all(p.state() == full.state() for p in parts)
  np.testing.assert_array_equal(
    eval_batches(tokens, 16, 8, 2, rows=[5, 6, 7])[1]["inputs"], eval_batches(tokens, 16, 8, 2)[1]["inputs"][5:]
  )
  with pytest.raises(ValueError, match="subset of"):
    PackedBatches(tokens, 16, 8, rows=[8])


def test_local_rows_single_process_is_the_whole_batch():
  from jaxllm.config import MeshConfig
  from jaxllm.parallel import batch_sharding, build_mesh

  mesh, plan = build_mesh(MeshConfig(dp=4, tp=2))
  np.testing.assert_array_equal(local_rows(batch_sharding(mesh, plan), (8, 32)), np.arange(8))


def test_distributed_settings_are_checked(monkeypatch):
  import jaxllm.parallel.distributed as D

  monkeypatch.setattr(D, "detected_cluster", lambda: None)  # even when the tests run under SLURM
  assert resolve(environ={}) is None  # single process: nothing to do
  c = resolve(
    environ={"JAXLLM_COORDINATOR": "h:1", "JAXLLM_NUM_PROCESSES": "2", "JAXLLM_PROCESS_ID": "1"}, mesh_devices=8
  )
  assert (c.num_processes, c.process_id, c.coordinator, c.source) == (2, 1, "h:1", "env")
  assert resolve("h:1", 2, 0, environ={}).source == "flags"
  with pytest.raises(DistributedError, match="2 processes x 3 local devices = 6"):
    resolve("h:1", 2, 0, local_devices=3, mesh_devices=8, environ={})
  with pytest.raises(DistributedError, match="cannot split evenly"):
    resolve("h:1", 3, 0, mesh_devices=8, environ={})
  with pytest.raises(DistributedError, match="missing --process-id"):
    resolve("h:1", 2, environ={})
  with pytest.raises(DistributedError, match=r"not in \[0, 2\)"):
    resolve("h:1", 2, 2, environ={})
  with pytest.raises(DistributedError, match="HOST:PORT"):
    resolve("h", 2, 0, environ={})
  with pytest.raises(DistributedError, match="not an integer"):
    resolve(environ={"JAXLLM_COORDINATOR": "h:1", "JAXLLM_NUM_PROCESSES": "two", "JAXLLM_PROCESS_ID": "0"})
