"""python -m jaxllm.data.prepare: token shards equal to the in-memory tokenization, resumable, with
clear errors. Every input and tokenizer is made here (no downloads)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxllm.data import ByteTokenizer, HFTokenizer, tokenize_documents
from jaxllm.data import prepare as prep
from jaxllm.data.shards import TokenShards

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "the quick brown fox jumps over lazy dogs while héllo wörld ünïcode ✓ 日本語 🙂 def return x".split()


def _texts(n, seed=0):
  rng = np.random.default_rng(seed)
  docs = [" ".join(rng.choice(WORDS, rng.integers(1, 60))) + "\n" * int(rng.integers(0, 3)) for _ in range(n)]
  return docs + ["", "def f(x):\n    return x + 1\n"]


def _bpe(path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
  tok.train_from_iterator(_texts(200, seed=1), trainer)
  tok.save(str(path))
  return str(path)


@pytest.fixture(params=["byte", "hf"])
def tokenizer_spec(request, tmp_path):
  return "byte" if request.param == "byte" else _bpe(tmp_path / "tokenizer.json")


def _write(fmt, directory, texts):
  """texts as input files of `fmt` in `directory` (sorted names keep the order)."""
  os.makedirs(directory, exist_ok=True)
  if fmt == "txt":
    for i, text in enumerate(texts):
      with open(os.path.join(directory, f"d{i:04d}.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(text)
  elif fmt == "jsonl":
    with open(os.path.join(directory, "a.jsonl"), "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), "text": texts})
    if fmt == "parquet":
      pq.write_table(table, os.path.join(directory, "a.parquet"), row_group_size=7)
    else:  # what `datasets` caches: the IPC stream format
      with pa.OSFile(os.path.join(directory, "a.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=9):
          w.write_batch(batch)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "arrow"])
def test_prepared_tokens_equal_tokenize_documents(tmp_path, tokenizer_spec, fmt):
  texts = _texts(60)
  _write(fmt, tmp_path / "in", texts)
  out = str(tmp_path / "out")
  summary = prep.prepare([str(tmp_path / "in")], tokenizer_spec, out, shard_mb=0.0005, workers=1, progress=False)
  tokenizer = ByteTokenizer() if tokenizer_spec == "byte" else HFTokenizer(tokenizer_spec)
  data = TokenShards(out, tokenizer)  # opens, checking every shard and the tokenizer
  assert summary["shards"] > 2 and len(data.manifest["shards"]) == summary["shards"]
  np.testing.assert_array_equal(data.read(0, len(data)), tokenize_documents(texts, tokenizer))
  assert data.num_documents == summary["documents"] == len(texts)
  assert data.manifest["text_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
  other = ByteTokenizer() if tokenizer_spec != "byte" else HFTokenizer(_bpe(tmp_path / "other.json"))
  with pytest.raises(ValueError, match="manifest.json was written by another tokenizer"):
    TokenShards(out, other)


@pytest.mark.parametrize("shard_mb", [64, 0.0002])  # one shard; shards of 200 bytes, cut at line ends
def test_txt_crlf_and_big_files_cut_into_documents(tmp_path, monkeypatch, shard_mb):
  monkeypatch.setattr(prep, "TXT_DOC_BYTES", 64)
  para = "a paragraph of words\nwith two lines\n\n"
  (tmp_path / "big.txt").write_bytes((para * 10).encode() + "é".encode() * 100 + b"\r\nend\r\n")
  out = str(tmp_path / "out")
  summary = prep.prepare([str(tmp_path / "big.txt")], "byte", out, shard_mb=shard_mb, workers=1, progress=False)
  assert (summary["shards"] > 2) == (shard_mb < 1)
  data = TokenShards(out)
  stream = data.read(0, len(data))
  docs = np.split(stream, np.flatnonzero(stream == ByteTokenizer.eos_id) + 1)[:-1]
  texts = [bytes(d[:-1].astype(np.uint8)).decode("utf-8") for d in docs]
  assert "".join(texts) == (para * 10) + "é" * 100 + "\nend\n"  # universal newlines, as train.data reads
  assert all(len(t.encode()) <= 64 for t in texts)
  if shard_mb > 1:  # within a shard, cut at blank lines where there are some (shards end at line ends)
    assert texts[:10] == [para] * 10


def _files(out):
  return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n != "plan.json"}


def test_resume_redoes_only_damaged_shards(tmp_path):
  _write("jsonl", tmp_path / "in", _texts(300))
  out = str(tmp_path / "out")
  kwargs = dict(shard_mb=0.002, workers=1, progress=False)
  first = prep.prepare([str(tmp_path / "in")], "byte", out, **kwargs)
  want = _files(out)
  os.remove(os.path.join(out, "manifest.json"))
  os.remove(os.path.join(out, "shard-00001.bin"))
  with open(os.path.join(out, "shard-00002.bin"), "r+b") as f:
    f.truncate(10)
  again = prep.prepare([str(tmp_path / "in")], "byte", out, **kwargs)
  assert again["resumed"] == first["shards"] - 2 and _files(out) == want


def test_resume_after_kill(tmp_path):
  _write("jsonl", tmp_path / "in", _texts(3000))
  cmd = [sys.executable, "-m", "jaxllm.data.prepare", str(tmp_path / "in"), "--shard-mb", "0.002", "--no-progress"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  clean = str(tmp_path / "clean")
  subprocess.run(cmd + ["--out", clean, "--workers", "1"], env=env, check=True, capture_output=True)
  out = str(tmp_path / "out")
  proc = subprocess.Popen(cmd + ["--out", out, "--workers", "2"], env=env, start_new_session=True)
  deadline = time.time() + 60
  while not os.path.exists(os.path.join(out, "shard-00003.json")) and time.time() < deadline:
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers, mid-run
  proc.wait()
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  with pytest.raises(ValueError, match="no manifest.json"):
    TokenShards(out)
  done = subprocess.run(cmd + ["--out", out], env=env, check=True, capture_output=True, text=True)
  shards, resumed = map(int, re.search(r"in (\d+) shards \((\d+) already done\)", done.stdout).groups())
  assert 0 < resumed < shards and _files(out) == _files(clean)


def test_plan_mismatch_and_overwrite(tmp_path):
  _write("txt", tmp_path / "in", _texts(5))
  out = str(tmp_path / "out")
  run = lambda spec, **kw: prep.prepare([str(tmp_path / "in")], spec, out, workers=1, progress=False, **kw)
  run("byte")
  with pytest.raises(ValueError, match="plan.json was made for other tokenizer .*--overwrite"):
    run(_bpe(tmp_path / "tok.json"))
  (tmp_path / "in" / "d0000.txt").write_text("changed text")
  with pytest.raises(ValueError, match="made for other inputs"):
    run("byte")
  run("byte", overwrite=True)
  assert TokenShards(out).read(0, 12).tolist() == list(b"changed text")


def test_errors(tmp_path):
  p = lambda inputs, out="out", **kw: prep.prepare(inputs, "byte", str(tmp_path / out), workers=1, progress=False, **kw)
  with pytest.raises(ValueError, match="no inputs"):
    p([])
  (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8 \(at byte 3\)"):
    p([str(tmp_path / "latin1.txt")], "o1")
  (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n\n{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"d\.jsonl:3: expected a JSON object with a string field 'text'.*--field"):
    p([str(tmp_path / "d.jsonl")], "o2")
  (tmp_path / "e.jsonl").write_text('{"text": "fine"}\n{"text": \n')
  with pytest.raises(ValueError, match=r"e\.jsonl:2: not valid JSON"):
    p([str(tmp_path / "e.jsonl")], "o3")
  (tmp_path / "notes.md").write_text("x")
  with pytest.raises(ValueError, match=r"notes\.md is not one of \.txt or \.jsonl or \.parquet or \.arrow"):
    p([str(tmp_path / "notes.md")], "o4")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "precious.txt").write_text("keep")
  with pytest.raises(ValueError, match="busy is a non-empty directory that prepare did not write"):
    p([str(tmp_path / "d.jsonl")], "busy", overwrite=True)
  assert (tmp_path / "busy" / "precious.txt").exists()
  (tmp_path / "killed").mkdir()
  (tmp_path / "killed" / "plan.json.tmp").write_text("{")  # a run killed while writing its plan
  (tmp_path / "ok.txt").write_text("fine")
  assert p([str(tmp_path / "ok.txt")], "killed")["documents"] == 1
  big = type("Big", (), {"vocab_size": (1 << 32) + 1, "eos_id": 0})()
  with pytest.raises(ValueError, match="uint32"):
    prep.check_tokenizer(big, "big.json")


def test_parquet_errors(tmp_path, monkeypatch):
  _write("parquet", tmp_path, ["a", "b"])
  with pytest.raises(ValueError, match=r"a\.parquet has no column 'body' \(it has \['id', 'text'\]\); .*--field"):
    prep.prepare([str(tmp_path / "a.parquet")], "byte", str(tmp_path / "o"), field="body", progress=False)
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
  with pytest.raises(ValueError, match=r"a\.parquet needs pyarrow.*pip install 'jaxllm\[data\]'"):
    prep.prepare([str(tmp_path / "a.parquet")], "byte", str(tmp_path / "o2"), progress=False)


def test_main_prints_summary_or_error(tmp_path, capsys):
  _write("txt", tmp_path / "in", ["one", "two"])
  assert prep.main([str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"]) == 0
  assert "2 documents, 8 tokens in 1 shards" in capsys.readouterr().out
  assert prep.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
  assert "prepare: error: data path" in capsys.readouterr().err
  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n' * 3 + '{"txt": "b"}\n')
  bad = [str(tmp_path / "bad.jsonl"), "--shard-mb", "0.00002", "--workers", "2", "--no-progress"]
  assert prep.main(bad + ["--out", str(tmp_path / "o3")]) == 2  # raised in a worker process
  assert "bad.jsonl:4: expected a JSON object with a string field 'text'" in capsys.readouterr().err
