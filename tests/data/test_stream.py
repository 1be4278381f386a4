"""Streamed batches from prepared directories (jaxllm.data.stream): the window permutation is a seeded
bijection, batches are PackedBatches' windows and document masks, mixtures keep their weights, the
position resumes exactly through the prefetch thread and across row splits, and bad input is named."""

import os
import threading

import numpy as np
import pytest

from jaxllm.config import ConfigError
from jaxllm.data import ByteTokenizer, PackedBatches, eval_batches, split_train_eval
from jaxllm.data.shards import write_manifest, write_shard
from jaxllm.data.stream import Mixture, StreamBatches, WindowPermutation, open_sources, parse_sources

EOS = ByteTokenizer.eos_id


def prepared_dir(directory, docs, per_shard=None, tokenizer=None):
  """Write `docs` (int id arrays) as a prepared directory (shards of `per_shard` docs) -> its path."""
  os.makedirs(directory, exist_ok=True)
  tokenizer = tokenizer or ByteTokenizer()
  per_shard = per_shard or len(docs)
  shards = [
    write_shard(str(directory), i, docs[j : j + per_shard], tokenizer.eos_id, np.uint16)
    for i, j in enumerate(range(0, len(docs), per_shard))
  ]
  write_manifest(str(directory), tokenizer, shards, 0, ["generated"])
  return str(directory)


def random_docs(n, seed=0, low=0, high=256, max_len=300):
  rng = np.random.default_rng(seed)
  return [rng.integers(low, high, rng.integers(1, max_len)).astype(np.int32) for _ in range(n)]


def flat(docs):
  return np.concatenate([x for d in docs for x in (d, [EOS])]).astype(np.int32)


def stream(dirs, seq_len=32, batch_size=8, **kw):
  return StreamBatches(open_sources(parse_sources(dirs), seq_len, ByteTokenizer()), seq_len, batch_size, **kw)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 100, 1000, 4097, 65537])
def test_window_permutation_is_a_seeded_bijection(n):
  perm = WindowPermutation(n, (7, 0, 0))
  got = perm(np.arange(n))
  np.testing.assert_array_equal(np.sort(got), np.arange(n))
  np.testing.assert_array_equal(perm(np.arange(n)[::-1]), got[::-1])  # elementwise, any order
  np.testing.assert_array_equal(WindowPermutation(n, (7, 0, 0))(np.arange(n)), got)  # a pure function of the key
  if n >= 100:
    assert (WindowPermutation(n, (7, 0, 1))(np.arange(n)) != got).mean() > 0.9  # another epoch, another order
    assert (got != np.arange(n)).mean() > 0.9
  with pytest.raises(IndexError):
    perm([n])


@pytest.mark.parametrize("reset", [False, True])
def test_unshuffled_stream_is_packed_batches_over_the_same_tokens(tmp_path, reset):
  """One source read in order, across shard boundaries and epochs: PackedBatches(shuffle=False)'s batches
  on the train split, document fields included, and loader.eval_batches on the eval split."""
  docs = random_docs(400)
  d = prepared_dir(tmp_path / "a", docs, per_shard=150)
  train, held = split_train_eval(flat(docs))
  got = stream([d], eos_id=EOS, reset_positions=reset, shuffle=False, prefetch=2)
  want = PackedBatches(train, 32, 8, shuffle=False, eos_id=EOS, reset_positions=reset)
  for _ in range(2 * want.batches_per_epoch + 3):
    a, b = next(got), next(want)
    assert a.keys() == b.keys()
    for k in b:
      np.testing.assert_array_equal(a[k], b[k])
  got.close()
  for a, b in zip(got.eval_batches(4), eval_batches(held, 32, 8, 4, eos_id=EOS, reset_positions=reset), strict=True):
    for k in b:
      np.testing.assert_array_equal(a[k], b[k])


def test_shuffled_epochs_visit_every_window_once(tmp_path):
  """Token i of one long document is i, so a row's first input is its window's start: each epoch is a
  permutation of the train windows, another for each epoch, and targets are inputs shifted by one."""
  d = prepared_dir(tmp_path / "a", [np.arange(50_000) % 60_000])
  got = stream([d], seq_len=16, batch_size=10, seed=3)
  n = got.sources[0].train_windows
  starts = np.concatenate([next(got)["inputs"][:, 0] for _ in range(2 * n // 10 + 1)])
  for e in range(2):
    epoch = starts[e * n : (e + 1) * n]
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n) * 16)
  assert (starts[:n] != starts[n : 2 * n]).mean() > 0.9
  b = next(got)
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  got.close()


def test_mixture_keeps_its_weights_and_is_a_function_of_position(tmp_path):
  mix = Mixture([0.7, 0.3], seed=5)
  source, k = mix.locate(np.arange(10_000))
  assert abs(np.mean(source == 0) - 0.7) < 0.01  # the bound; exact at every block end:
  np.testing.assert_array_equal([np.bincount(b) for b in source.reshape(-1, 1000)], [[700, 300]] * 10)
  assert (source[:1000] != Mixture([0.7, 0.3], seed=6).locate(np.arange(1000))[0]).any()  # the seed's order
  for s in (0, 1):  # each source's own sequence numbers run 0, 1, 2, ... in order of position
    np.testing.assert_array_equal(k[source == s], np.arange(np.sum(source == s)))
  np.testing.assert_array_equal(mix.consumed(4321), np.bincount(source[:4321], minlength=2))
  # Through the batches: source A holds ids < 256, B ids in [1000, 2000).
  a = prepared_dir(tmp_path / "a", random_docs(300, seed=1))
  b = prepared_dir(tmp_path / "b", random_docs(300, seed=2, low=1000, high=2000))
  got = stream([f"{a}:0.7", f"{b}:0.3"], batch_size=50, seed=5, prefetch=0)
  rows = np.concatenate([next(got)["inputs"] for _ in range(200)])  # 10,000 sequences
  from_b = (rows >= 1000) & (rows != EOS)
  from_a = (rows < 256) | (rows == EOS)
  assert (from_a.all(1) | from_b.any(1)).all()
  assert abs(from_b.any(1).mean() - 0.3) < 0.01
  assert got.consumed_tokens() == {"a": 7000 * 32, "b": 3000 * 32}
  late = stream([f"{a}:0.7", f"{b}:0.3"], batch_size=50, seed=5, prefetch=0)
  late.restore(got.state() | {"position": 50 * 123})  # the batch at position g is a function of (g, seed)
  np.testing.assert_array_equal(next(late)["inputs"], rows[50 * 123 : 50 * 124])


def test_state_is_the_handed_out_position_and_restores_through_prefetch(tmp_path):
  d = prepared_dir(tmp_path / "a", random_docs(300))
  first = stream([d], seed=1, eos_id=EOS, prefetch=3)
  for _ in range(7):
    next(first)
  state = first.state()
  assert state["position"] == 7 * 8  # not counting the prefetched batches
  want = [next(first) for _ in range(5)]
  assert first._thread.is_alive()
  thread = first._thread
  first.close()
  assert not thread.is_alive()
  second = stream([d], seed=99, eos_id=EOS, prefetch=3)  # the checkpoint's seed wins
  next(second)
  second.restore(state)
  for w in want:
    g = next(second)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])
  second.close()
  assert not [t for t in threading.enumerate() if t.name == "data-prefetch"]


def test_process_rows_rebuild_the_global_batch(tmp_path):
  a = prepared_dir(tmp_path / "a", random_docs(200, seed=1))
  b = prepared_dir(tmp_path / "b", random_docs(200, seed=2))
  full = stream([f"{a}:2", f"{b}:1"], seed=4)
  parts = [stream([f"{a}:2", f"{b}:1"], seed=4, rows=r) for r in (np.arange(0, 4), np.arange(4, 8))]
  for _ in range(40):
    want, got = next(full), [next(p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([g["inputs"] for g in got]), want["inputs"])
  assert all(p.state() == full.state() for p in parts)
  for s in (full, *parts):
    s.close()


def test_restore_refuses_other_data_or_shapes(tmp_path):
  a = prepared_dir(tmp_path / "a", random_docs(200, seed=1))
  b = prepared_dir(tmp_path / "b", random_docs(200, seed=2))
  c = prepared_dir(tmp_path / "c", random_docs(201, seed=2))
  state = stream([f"{a}:0.7", f"{b}:0.3"], prefetch=0).state()
  with pytest.raises(ValueError, match="batch_size: 8 in the checkpoint, 4 now"):
    stream([f"{a}:0.7", f"{b}:0.3"], batch_size=4).restore(state)
  with pytest.raises(ValueError, match="weight 0.3 in the checkpoint, 0.5 now"):
    stream([f"{a}:0.5", f"{b}:0.5"]).restore(state)
  with pytest.raises(ValueError, match="tokens"):
    stream([f"{a}:0.7", f"{c}:0.3"]).restore(state)
  with pytest.raises(ValueError, match="1 source\\(s\\) in the checkpoint, 2 now"):
    stream([f"{a}:0.7", f"{b}:0.3"]).restore(stream([a]).state())
  with pytest.raises(ValueError, match="in-memory data"):
    stream([a]).restore(PackedBatches(np.arange(1000), 32, 8).state())


def test_bad_sources_are_named(tmp_path):
  a = prepared_dir(tmp_path / "a", random_docs(100))
  for bad in (f"{a}:abc", f"{a}:0", f"{a}:-1", f"{a}:nan"):
    with pytest.raises(ConfigError, match="not a positive weight; write DIR:WEIGHT"):
      parse_sources([bad])
  text = tmp_path / "x.txt"
  text.write_text("hello")
  with pytest.raises(ConfigError, match="mixes prepared directories with other paths"):
    parse_sources([a, str(text)])
  with pytest.raises(ConfigError, match="weights apply to prepared directories"):
    parse_sources([f"{text}:0.5"])
  with pytest.raises(ConfigError, match="every directory a weight \\(DIR:WEIGHT\\) or none"):
    parse_sources([f"{a}:0.5", a])
  assert parse_sources([str(text)]) is None
  assert [w for _, w in parse_sources([f"{a}:3", f"{a}:1"])] == [3.0, 1.0]

  class OtherTokenizer(ByteTokenizer):  # same vocabulary size, another tokenizer.json
    path = str(tmp_path / "tokenizer.json")

  (tmp_path / "tokenizer.json").write_text("{}")
  other = prepared_dir(tmp_path / "other", random_docs(100), tokenizer=OtherTokenizer())
  with pytest.raises(ValueError, match=f"{other}/manifest.json was written by another tokenizer"):
    open_sources(parse_sources([other]), 32, ByteTokenizer())
  cut = prepared_dir(tmp_path / "cut", random_docs(100), per_shard=50)
  with open(os.path.join(cut, "shard-00001.bin"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match=f"shard {cut}/shard-00001.bin has 100 bytes"):
    open_sources(parse_sources([cut]), 32, ByteTokenizer())
  with pytest.raises(ValueError, match="not one sequence of seq_len=100000"):
    open_sources(parse_sources([a]), 100_000, ByteTokenizer())
