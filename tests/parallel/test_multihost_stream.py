"""Streaming prepared data on 2 processes x 4 CPU devices (the multi-host test's loopback setup): each
process reads only its rows of every batch from the shards, the losses equal the single-process run's,
and checkpoints resume across process counts (2x4 -> 1x8; 1x8 -> 2x4 marked slow) with the batches the
uninterrupted run saw."""

import pytest
from test_multihost import ARGS, MESH, _assert_same, _losses, _run_two_processes
from test_train_stream import stdlib_dir

from jaxllm.config import load_config
from jaxllm.train.loop import train


def _cfg(out, steps, data):
  return load_config([], [f"mesh={MESH}", *ARGS, f"train.data={data}", f"train.steps={steps}", f"train.out_dir={out}"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A 0.7/0.3 mixture of two prepared directories."""
  root = tmp_path_factory.mktemp("data")
  return f"{stdlib_dir(root / 'a', 60_000)}:0.7,{stdlib_dir(root / 'b', 40_000, offset=60_000)}:0.3"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
  """The uninterrupted single-process 8-device run: 6 steps."""
  out = tmp_path_factory.mktemp("ref")
  train(_cfg(out, 6, data), progress=False, log=lambda *_: None)
  return _losses(out)


def test_two_processes_stream_as_one_and_resume_on_one(tmp_path, data, reference):
  out = tmp_path / "two"
  p0, _ = _run_two_processes(out, 3, extra=[f"train.data={data}"])
  assert "trained to step 3" in p0 and "weight 0.700" in p0
  got = _losses(out)
  assert sorted(got) == [1, 2, 3]
  _assert_same(got, reference, [1, 2, 3])  # eval at step 3 too
  assert got[3]["tokens/a"] == reference[3]["tokens/a"]
  resumed = train(_cfg(out, 6, data), progress=False, log=lambda *_: None)
  assert resumed["history"][0]["step"] == 4
  _assert_same(_losses(out), reference, [4, 5, 6])


@pytest.mark.slow
def test_one_process_checkpoint_streams_on_two(tmp_path, data, reference):
  """A 1 x 8 checkpoint at step 3 resumed by 2 processes x 4: steps 4-6 equal the uninterrupted run."""
  out = tmp_path / "one"
  train(_cfg(out, 3, data), progress=False, log=lambda *_: None)
  p0, _ = _run_two_processes(out, 6, extra=[f"train.data={data}"])
  assert "resumed from" in p0 and "trained to step 6" in p0
  _assert_same(_losses(out), reference, [1, 2, 3, 4, 5, 6])
