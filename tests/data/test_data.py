"""jaxllm.data: tokenizers, corpora, packing and resumable iteration. Pure numpy, no jax."""

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.data import (
  ByteTokenizer,
  HFTokenizer,
  PackedBatches,
  default_corpus_text,
  eval_batches,
  load_texts,
  load_tokenizer,
  split_train_eval,
  tokenize_documents,
)

TEXTS = ["héllo wörld — ünïcode ✓ 日本語 🙂", "def f(x):\n    return x + 1\n", ""]


# --- tokenizers --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
  tok = load_tokenizer("byte")
  ids = tok.encode(text)
  assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.encode_np(text).dtype == np.int32 and tok.encode_np(text).tolist() == ids
  # Specials (and ids above the vocab, as a padded model may sample) decode to nothing.
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, 400]) == text
  assert tok.encode(text, add_bos=True) == [256, *ids]
  assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)


def test_byte_tokenizer_decodes_a_cut_character():
  ids = ByteTokenizer().encode("ü")[:1]
  assert ByteTokenizer().decode(ids) == "\ufffd"


def _train_hf_tokenizer(path, special_tokens=("<|endoftext|>",)):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(TEXTS * 10 + ["the quick brown fox jumps over the lazy dog"] * 10, trainer)
  tok.save(str(path))
  return tok


def test_hf_tokenizer_round_trip(tmp_path):
  raw = _train_hf_tokenizer(tmp_path / "tokenizer.json")
  for spec in (str(tmp_path), str(tmp_path / "tokenizer.json")):
    tok = load_tokenizer(spec)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    eot = raw.token_to_id("<|endoftext|>")
    assert tok.eos_id == eot and tok.pad_id == eot and tok.bos_id is None  # GPT-2 style
    for text in TEXTS + ["unseen wörds too"]:
      ids = tok.encode(text)
      assert tok.decode(ids) == text
      assert tok.encode_np(text).tolist() == ids
      assert tok.encode(text, add_bos=True) == ids  # no bos token: nothing to add
    assert tok.decode([eot, *tok.encode("fox"), eot]) == "fox"


def test_hf_tokenizer_config_names_special_tokens(tmp_path):
  raw = _train_hf_tokenizer(tmp_path / "tokenizer.json", ("<s>", "</s>", "<|im_end|>", "<unk>"))
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "<|im_end|>", "pad_token": "<unk>"})
  )
  tok = load_tokenizer(str(tmp_path))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(raw.token_to_id(t) for t in ("<s>", "<|im_end|>", "<unk>"))
  assert tok.encode("fox", add_bos=True)[0] == tok.bos_id
  # Without the config the vocabulary guess picks the document separator, not the chat marker.
  (tmp_path / "tokenizer_config.json").unlink()
  assert load_tokenizer(str(tmp_path)).eos_id == raw.token_to_id("</s>")


def test_missing_tokenizer_error(tmp_path):
  with pytest.raises(ValueError, match=r"no file at .*tokenizer\.json.*\"byte\".*needs no files"):
    load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="nothere.json"):
    load_tokenizer(str(tmp_path / "nothere.json"))


# --- corpora -----------------------------------------------------------------------------------


def test_default_corpus_deterministic_python_source():
  a, b = default_corpus_text(), default_corpus_text()
  assert a == b
  assert len(a.encode("utf-8")) == 8_000_000
  assert a.startswith("# file: ") and "\ndef " in a and "\nclass " in a and "\nimport " in a
  files = re.findall(r"^# file: (\S+\.py)$", a, flags=re.M)
  assert len(files) > 50 and files == sorted(files)
  assert not [f for f in files if {"test", "tests", "idle_test", "site-packages"} & set(f.split("/"))]
  small = default_corpus_text(100_000)
  assert len(small.encode("utf-8")) <= 100_000 and a.startswith(small)


def test_load_texts_txt_jsonl_and_dirs(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("doc b\nline 2")
  (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
  (tmp_path / "sub" / "c.txt").write_text("doc c")
  (tmp_path / "ignored.md").write_text("not corpus")
  assert load_texts([str(tmp_path)]) == ["one", "two", "doc b\nline 2", "doc c"]
  assert load_texts([str(tmp_path / "b.txt"), str(tmp_path / "a.jsonl")]) == ["doc b\nline 2", "one", "two"]
  (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
  assert load_texts([str(tmp_path / "c.jsonl")], text_field="body") == ["x"]


@pytest.mark.parametrize("bad_line", ['{"content": "x"}', '["text"]', '{"text": 3}', '{"text": "x"'])
def test_jsonl_bad_line_error(tmp_path, bad_line):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "fine"}\n' + bad_line + "\n")
  with pytest.raises(ValueError, match=r"d\.jsonl:2: .*string field 'text'"):
    load_texts([str(path)])


def test_load_texts_missing_path_error(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    load_texts([str(tmp_path / "missing.txt")])
  with pytest.raises(ValueError, match="no .txt or .jsonl"):
    load_texts([str(tmp_path)])


def test_tokenize_documents_and_split():
  tok = ByteTokenizer()
  stream = tokenize_documents(["ab", "", "ü"], tok)
  assert stream.dtype == np.int32
  assert stream.tolist() == [97, 98, 257, 257, *"ü".encode("utf-8"), 257]
  tokens = np.arange(100_000, dtype=np.int32)
  train, ev = split_train_eval(tokens, eval_fraction=0.01)
  assert len(ev) == 8192 and np.array_equal(np.concatenate([train, ev]), tokens)
  train, ev = split_train_eval(tokens[:1000])  # the minimum never takes more than a tenth
  assert len(ev) == 100 and len(train) == 900


# --- packing and resumption --------------------------------------------------------------------


def _stream(n, seed=0):
  return np.random.default_rng(seed).integers(0, 259, size=n).astype(np.int32)


def test_packing_targets_shift_and_windows_come_from_stream():
  tokens = np.arange(10_000, dtype=np.int32) * 3  # distinct values: a row shows where it came from
  seq_len = 32
  for batch in eval_batches(tokens, seq_len, 4, 3) + [next(PackedBatches(tokens, seq_len, 4))]:
    assert batch["inputs"].shape == batch["targets"].shape == (4, seq_len)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    for inp, tgt in zip(batch["inputs"], batch["targets"]):
      start = int(inp[0]) // 3
      assert start % seq_len == 0  # windows start at multiples of seq_len
      np.testing.assert_array_equal(inp, tokens[start : start + seq_len])
      np.testing.assert_array_equal(tgt, tokens[start + 1 : start + seq_len + 1])


def _window_ids(batch, seq_len):
  # Tokens are arange(n): a window's first input is its start position.
  return (batch["inputs"][:, 0] // seq_len).tolist()


def test_every_window_once_per_epoch_and_epochs_differ():
  seq_len, batch_size = 8, 4
  tokens = np.arange(10 * seq_len * batch_size + 1, dtype=np.int32)
  it = PackedBatches(tokens, seq_len, batch_size, seed=3)
  assert it.num_windows == 40 and it.batches_per_epoch == 10
  epochs = [sum((_window_ids(next(it), seq_len) for _ in range(10)), []) for _ in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(40))
  assert epochs[0] != epochs[1] != epochs[2]
  assert it.state()["epoch"] == 3 and it.state()["index"] == 0
  unshuffled = PackedBatches(tokens, seq_len, batch_size, shuffle=False)
  assert sum((_window_ids(next(unshuffled), seq_len) for _ in range(10)), []) == list(range(40))


def test_uneven_epochs_straddle_without_dropping():
  seq_len, batch_size = 4, 3
  tokens = np.arange(10 * seq_len + 1, dtype=np.int32)  # 10 windows, 3 per batch
  it = PackedBatches(tokens, seq_len, batch_size, seed=1)
  order = sum((_window_ids(next(it), seq_len) for _ in range(10)), [])  # 30 windows = 3 epochs
  for e in range(3):
    assert sorted(order[10 * e : 10 * (e + 1)]) == list(range(10))


def _equal_batches(a, b):
  return all(
    np.array_equal(x["inputs"], y["inputs"]) and np.array_equal(x["targets"], y["targets"])
    for x, y in zip(a, b, strict=True)
  )


@settings(max_examples=40, deadline=None)
@given(
  n_tokens=st.integers(50, 2000),
  seq_len=st.integers(1, 16),
  batch_size=st.integers(1, 5),
  seed=st.integers(0, 2**32 - 1),
  k=st.integers(0, 60),
  shuffle=st.booleans(),
)
def test_resume_continues_exactly(n_tokens, seq_len, batch_size, seed, k, shuffle):
  tokens = _stream(n_tokens, seed % 1000)
  if (n_tokens - 1) // seq_len < batch_size:
    with pytest.raises(ValueError):
      PackedBatches(tokens, seq_len, batch_size)
    return
  reference = PackedBatches(tokens, seq_len, batch_size, seed=seed, shuffle=shuffle)
  uninterrupted = [next(reference) for _ in range(k + 5)]
  first = PackedBatches(tokens, seq_len, batch_size, seed=seed, shuffle=shuffle)
  for _ in range(k):
    next(first)
  saved = json.loads(json.dumps(first.state()))  # as a checkpoint would store it
  resumed = PackedBatches(tokens, seq_len, batch_size, seed=seed, shuffle=shuffle)
  resumed.restore(saved)
  assert _equal_batches([next(resumed) for _ in range(5)], uninterrupted[k:])


def test_restore_uses_checkpoint_seed():
  tokens = _stream(5000)
  a = PackedBatches(tokens, 16, 4, seed=7)
  next(a)
  b = PackedBatches(tokens, 16, 4, seed=99)
  b.restore(a.state())
  assert _equal_batches([next(b)], [next(a)])


@pytest.mark.parametrize("field,value", [("seq_len", 32), ("batch_size", 8), ("num_tokens", 4999)])
def test_restore_mismatch_error(field, value):
  tokens = _stream(5000)
  state = PackedBatches(tokens, 16, 4).state()
  state[field] = value
  with pytest.raises(ValueError, match=rf"{field}: {value} in the checkpoint.*changed since the checkpoint"):
    PackedBatches(tokens, 16, 4).restore(state)
  with pytest.raises(ValueError, match="missing"):
    PackedBatches(tokens, 16, 4).restore({"epoch": 0})


def test_too_small_corpus_error():
  # 8 sequences of 16 need 8*16+1 = 129 tokens.
  PackedBatches(_stream(129), 16, 8)
  with pytest.raises(ValueError, match=r"128 tokens make 7 sequences .*batch_size=8.*at least 129 tokens"):
    PackedBatches(_stream(128), 16, 8)
  with pytest.raises(ValueError, match="eval split has 128 tokens"):
    eval_batches(_stream(128), 16, 8, 2)


def test_eval_batches_deterministic_in_order():
  tokens = np.arange(1000, dtype=np.int32)
  a, b = eval_batches(tokens, 10, 4, 100), eval_batches(tokens, 10, 4, 100)
  assert len(a) == 99 // 4 and _equal_batches(a, b)
  assert sum((_window_ids(x, 10) for x in a), []) == list(range(len(a) * 4))
  assert len(eval_batches(tokens, 10, 4, 2)) == 2 and eval_batches(tokens, 10, 4, 0) == []


def test_epoch_indices_cover_each_epoch_once_and_resume_from_the_step():
  from jaxllm.data.loader import epoch_indices

  n, b = 6, 4
  stream = np.concatenate([epoch_indices(n, b, s, seed=3) for s in range(6)])  # 24 = 4 epochs
  for e in range(4):
    assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))
  assert not all((stream[:n] == stream[n : 2 * n]))  # reshuffled per epoch
  np.testing.assert_array_equal(epoch_indices(n, b, 4, seed=3), stream[16:20])  # from the step alone
  assert not np.array_equal(epoch_indices(n, b, 0, seed=4), stream[:4])
