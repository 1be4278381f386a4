"""Training on prepared directories (train.data=DIR, DIR_A:0.7,DIR_B:0.3): a run killed at step k and
resumed has the uninterrupted run's losses, metrics carry the data wait and per-source tokens, and
bad data settings fail before training with the file named."""

import json

import numpy as np
import pytest
from test_multihost import ARGS, MESH
from test_stream import prepared_dir

from jaxllm.config import ConfigError, load_config
from jaxllm.data import ByteTokenizer, default_corpus_text
from jaxllm.train.loop import train


def stdlib_dir(directory, max_bytes=80_000, offset=0):
  """The embedded corpus's text, one document per stdlib file, prepared with the byte tokenizer."""
  text = default_corpus_text(offset + max_bytes)[offset:]
  docs = [ByteTokenizer().encode_np(d) for d in text.split("# file: ") if d]
  return prepared_dir(directory, docs, per_shard=max(1, len(docs) // 3))


def _cfg(out, data, steps=6, *extra):
  """test_multihost's run (tiny model, cpu-8 mesh, eval and checkpoint every 3 steps) on `data`."""
  return load_config(
    [], [f"mesh={MESH}", *ARGS, f"train.data={data}", f"train.steps={steps}", f"train.out_dir={out}", *extra]
  )


def _run(cfg, **kw):
  return train(cfg, progress=False, log=lambda *_: None, **kw)


def test_streamed_run_resumes_exactly_and_logs_data(tmp_path):
  a = stdlib_dir(tmp_path / "a")
  b = stdlib_dir(tmp_path / "b", 40_000, offset=80_000)
  data = f"{a}:0.7,{b}:0.3"
  lines = []
  full = train(_cfg(tmp_path / "full", data), progress=False, log=lines.append)
  assert any(line.startswith(f"data {a}:") and "weight 0.700" in line for line in lines), lines
  assert full["last_loss"] < full["first_loss"]
  # Killed after 5 steps (checkpoint at 3): the resumed run replays 4..6 with the same batches.
  part = _cfg(tmp_path / "part", data)
  assert _run(part, stop_after=5)["steps"] == 5
  second = _run(part)
  assert second["history"][0]["step"] == 4
  want = {h["step"]: h for h in full["history"]}
  for h in second["history"]:
    assert h["loss"] == pytest.approx(want[h["step"]]["loss"], rel=1e-5), h
  assert second["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
  records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
  last = records[-1]
  assert last["tokens/a"] + last["tokens/b"] == 6 * 8 * 32 and abs(last["tokens/a"] / (6 * 8 * 32) - 0.7) < 0.1
  assert all(0 <= r["data_wait_s"] < 1 for r in records if "loss" in r)
  # Another batch size cannot continue this data order.
  with pytest.raises(ValueError, match="batch_size: 8 in the checkpoint, 16 now"):
    _run(_cfg(tmp_path / "part", data, 12, "train.batch_size=16"))


def test_bad_data_settings_fail_before_training(tmp_path):
  a = stdlib_dir(tmp_path / "a", 30_000)
  text = tmp_path / "notes.txt"
  text.write_text("some text\n" * 100)
  with pytest.raises(ConfigError, match="mixes prepared directories with other paths"):
    _run(_cfg(tmp_path / "o1", f"{a},{text}"))
  with pytest.raises(ConfigError, match="'x' is not a positive weight"):
    _run(_cfg(tmp_path / "o2", f"{a}:x"))

  class OtherTokenizer(ByteTokenizer):
    path = str(text)

  other = prepared_dir(tmp_path / "other", [np.arange(5000) % 256], tokenizer=OtherTokenizer())
  with pytest.raises(ValueError, match=f"{other}/manifest.json was written by another tokenizer"):
    _run(_cfg(tmp_path / "o3", other))
  assert not (tmp_path / "o3").exists()  # nothing written
