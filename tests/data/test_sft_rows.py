"""SFT rows: the jsonl formats and their errors, chat templates (the plain default and real Hugging Face
ones, checked against transformers), loss masks of prompt/completion and assistant spans, the layout
that keeps each SFT row inside one sequence, long-row truncation counts, and the loss-mask / document
streams through the batch iterators. Pure numpy (transformers only as the reference renderer)."""

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxllm.data import (
  DEFAULT_TEMPLATE,
  ByteTokenizer,
  ChatFormat,
  PackedBatches,
  Row,
  TokenStream,
  build_stream,
  eval_batches,
  load_rows,
  load_texts,
  load_tokenizer,
  split_train_eval,
  tokenize_documents,
)

BYTE = ByteTokenizer()
EOS = BYTE.eos_id
CHAT = [
  {"role": "system", "content": "Be terse."},
  {"role": "user", "content": "hello"},
  {"role": "assistant", "content": "hi there"},
  {"role": "user", "content": "how are you?"},
  {"role": "assistant", "content": "fine"},
]
# Qwen2-Instruct's chat template, as its tokenizer_config.json ships it (ChatML with a default system turn).
QWEN2 = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML with transformers' {% generation %} markup around the assistant's part (its assistant mask).
GENERATION = (
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
  "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
  "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _chatml_tokenizer(directory, template=QWEN2, **config):
  """A byte-level BPE tokenizer.json with ChatML specials, "<|im_end|>" named as eos (as Qwen2.5's
  tokenizer_config.json does: the chat end-of-turn is also the document separator)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(["You are a helpful assistant. hello there, how are you? fine system user"] * 10, trainer)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **config}
  if template is not None:
    cfg["chat_template"] = template
  (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
  return load_tokenizer(str(directory))


def _transformers(tokenizer, template):
  from transformers import PreTrainedTokenizerFast

  return PreTrainedTokenizerFast(tokenizer_file=tokenizer.path, eos_token="<|im_end|>", chat_template=template)


def _spans(stream):
  """[(text of a maximal run of trained tokens)] of a byte-tokenizer stream (eos shown as '<eos>')."""
  out, cur = [], ""
  for t, m in zip(stream.tokens.tolist(), stream.loss_mask.tolist()):
    if m:
      cur += "<eos>" if t == EOS else chr(t)
    elif cur:
      out, cur = out + [cur], ""
  return out + ([cur] if cur else [])


# --- rows --------------------------------------------------------------------------------------


def test_load_rows_mixed_files_dirs_and_globs(tmp_path):
  (tmp_path / "d").mkdir()
  a = _write_jsonl(
    tmp_path / "d" / "a.jsonl",
    [{"text": "plain", "id": 1}, {"prompt": "1+1=", "completion": "2"}, "", {"messages": CHAT, "source": "x"}],
  )
  (tmp_path / "d" / "b.txt").write_text("a whole file")
  rows = load_rows([str(tmp_path / "d")])
  assert [r.kind for r in rows] == ["text", "completion", "messages", "text"]
  assert rows[0] == Row("text", "plain", f"{a}:1") and rows[1].data == ("1+1=", "2") and rows[2].where == f"{a}:4"
  assert rows[3] == Row("text", "a whole file", str(tmp_path / "d" / "b.txt"))
  assert load_rows([str(tmp_path / "d" / "*.jsonl")]) == rows[:3]  # a glob
  assert load_texts([str(tmp_path / "d" / "*.txt")]) == ["a whole file"]
  with pytest.raises(ValueError, match="matches no files"):
    load_rows([str(tmp_path / "d" / "*.parquet")])


@pytest.mark.parametrize(
  "bad,match",
  [
    ('{"text": "x"', "not valid JSON"),
    ('["text"]', "expected a JSON object"),
    ('{"content": "x"}', "exactly one of"),
    ('{"text": "x", "messages": []}', "exactly one of"),
    ('{"text": 3}', "'text' must be a string"),
    ('{"prompt": "x"}', "string 'completion', found nothing"),
    ('{"completion": "x"}', "string 'prompt', found nothing"),
    ('{"prompt": "x", "completion": 5}', "string 'completion', found a int"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] must be an object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no 'assistant' message"),
  ],
)
def test_malformed_row_names_file_line_and_problem(tmp_path, bad, match):
  path = tmp_path / "rows.jsonl"
  path.write_text('{"prompt": "a", "completion": "b"}\n' + bad + "\n")
  with pytest.raises(ValueError, match=rf"rows\.jsonl:2: .*{match}"):
    load_rows([str(path)])


# --- masks -------------------------------------------------------------------------------------


def test_text_rows_give_todays_stream_and_train_every_token():
  texts = ["ab", "", "ü"]
  stream, stats = build_stream([Row("text", t, "f") for t in texts], BYTE, 4)
  assert np.array_equal(stream.tokens, tokenize_documents(texts, BYTE))
  assert stream.loss_mask is None and stream.doc_ends is None  # no loss mask: every token, as before
  assert stats.sft_rows == 0 and stats.trained_tokens == stats.tokens == len(stream)


def test_prompt_completion_masks_the_prompt():
  stream, stats = build_stream([Row("completion", ("12+30=", "42\n"), "f:1"), Row("text", "xy", "f:2")], BYTE, 64)
  want = [*b"12+30=", *b"42\n", EOS, *b"xy", EOS]
  assert stream.tokens.tolist() == want
  assert stream.loss_mask.astype(int).tolist() == [0] * 6 + [1] * 4 + [1] * 3  # completion + its eos; text all
  assert stream.doc_ends.astype(int).tolist() == [0] * 9 + [1] + [0, 0, 1]
  assert _spans(stream) == ["42\n<eos>xy<eos>"] and stats.rows == {"text": 1, "completion": 1, "messages": 0}


def test_default_template_trains_the_assistant_turns_only():
  assert ChatFormat(None, BYTE).source == DEFAULT_TEMPLATE
  stream, _ = build_stream([Row("messages", CHAT, "f:1")], BYTE, 256)
  text = "".join("<eos>" if t == EOS else chr(t) for t in stream.tokens.tolist())
  assert text == (
    "system: Be terse.\nuser: hello\nassistant: hi there<eos>\nuser: how are you?\nassistant: fine<eos>\n<eos>"
  )
  # Each turn's text after "assistant:" through its eos and newline; the row's closing eos is not trained.
  assert _spans(stream) == [" hi there<eos>\n", " fine<eos>\n"]
  assert stream.doc_ends.sum() == 1 and stream.doc_ends[-1]  # the template's eos tokens do not split it
  # The prompt before an assistant turn is what the server encodes for that conversation.
  fmt = ChatFormat(None, BYTE)
  assert stream.tokens[: len(fmt.encode(CHAT[:2]))].tolist() == fmt.encode(CHAT[:2])
  assert fmt.render(CHAT[:2]) == "system: Be terse.\nuser: hello\nassistant:"
  # A later prompt holds the earlier answer as trained: its eos too (shown as "" in the text).
  assert fmt.encode(CHAT[:4]) == stream.tokens[: len(fmt.encode(CHAT[:4]))].tolist()
  assert fmt.encode(CHAT[:4]).count(EOS) == 1 and fmt.render(CHAT[:4]).endswith(
    "hi there\nuser: how are you?\nassistant:"
  )


def test_real_hf_chat_template_masks_assistant_spans(tmp_path):
  tok = _chatml_tokenizer(tmp_path / "tok")
  assert (
    tok.chat_template == QWEN2
    and tok.decode([tok.eos_id]) == ""
    and tok.tokenizer.id_to_token(tok.eos_id) == ("<|im_end|>")
  )
  rows = [Row("messages", CHAT[1:], "f:1")]  # no system turn: the template adds its default one
  stream, stats = build_stream(rows, tok, 256)
  ids, mask = stream.tokens[:-1].tolist(), stream.loss_mask[:-1]
  reference = _transformers(tok, QWEN2)
  assert reference.apply_chat_template(CHAT[1:], tokenize=False) == ChatFormat(QWEN2, tok).render(CHAT[1:], False)
  assert ids == list(reference.apply_chat_template(CHAT[1:], tokenize=True, return_dict=True)["input_ids"])
  trained = [tok.tokenizer.decode(ids[i : j + 1], skip_special_tokens=False) for i, j in _runs(mask)]
  assert trained == ["hi there<|im_end|>\n", "fine<|im_end|>\n"]
  untrained = tok.tokenizer.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
  assert untrained == (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
    "<|im_start|>assistant\n<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\n"
  )
  # "<|im_end|>" is this tokenizer's eos: only the row's closing one ends the document.
  assert (stream.tokens == tok.eos_id).sum() == 6 and stream.doc_ends.sum() == 1 and not stream.loss_mask[-1]
  assert stats.turns_missed == 0


def test_assistant_spans_equal_transformers_generation_mask(tmp_path):
  tok = _chatml_tokenizer(tmp_path / "tok", template=GENERATION)
  stream, _ = build_stream([Row("messages", CHAT, "f:1")], tok, 256)
  ref = _transformers(tok, GENERATION).apply_chat_template(
    CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
  )
  assert stream.tokens[:-1].tolist() == list(ref["input_ids"])
  assert stream.loss_mask[:-1].astype(int).tolist() == list(ref["assistant_masks"])


def _runs(mask):
  """(first, last) index of each maximal run of True."""
  idx = np.flatnonzero(mask)
  breaks = np.flatnonzero(np.diff(idx) > 1)
  return list(zip(idx[np.r_[0, breaks + 1]], idx[np.r_[breaks, len(idx) - 1]]))


def test_template_that_rewrites_earlier_turns():
  """An assistant turn rendered differently once later turns follow cannot be located: masked out and
  counted; a conversation with no locatable turn is an error naming its line."""
  src = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{{ '[earlier answer]' if m['role'] == 'assistant' and not loop.last else m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
  )
  stream, stats = build_stream([Row("messages", CHAT, "f:1")], BYTE, 256, chat_template=src)
  assert _spans(stream) == ["fine\n"] and stats.turns_missed == 1
  with pytest.raises(ValueError, match="f:7: no assistant turn .* could be located"):
    build_stream([Row("messages", CHAT[:4], "f:7")], BYTE, 256, chat_template=src)
  with pytest.raises(ValueError, match="f:8: the chat template rejected this conversation: no system"):
    build_stream([Row("messages", CHAT, "f:8")], BYTE, 256, chat_template="{{ raise_exception('no system') }}")


def test_tokenizer_finds_its_chat_template(tmp_path):
  tok = _chatml_tokenizer(tmp_path / "a", template=None)
  assert tok.chat_template is None and BYTE.chat_template is None
  (tmp_path / "a" / "chat_template.jinja").write_text(GENERATION)
  assert load_tokenizer(str(tmp_path / "a")).chat_template == GENERATION
  tok = _chatml_tokenizer(tmp_path / "b", template=[{"name": "default", "template": QWEN2}])
  assert tok.chat_template == QWEN2


# --- long rows and layout ----------------------------------------------------------------------


def test_long_rows_truncate_or_drop_and_are_counted():
  T = 8
  rows = [
    Row("completion", ("ab", "cdefghijkl"), "f:1"),  # 12 tokens: long, keeps "ab" + "cdefgh"
    Row("completion", ("abcdefghij", "xy"), "f:2"),  # long, and the cut leaves no completion token
    Row("completion", ("a", "b"), "f:3"),
    Row("text", "t" * 20, "f:4"),  # text rows are never cut (pretraining packs them across sequences)
  ]
  stream, stats = build_stream(rows, BYTE, T)
  assert (stats.truncated, stats.dropped, stats.emptied) == (2, 0, 1)
  assert stream.tokens[:9].tolist() == [*b"abcdefgh", EOS] and _spans(stream)[0] == "cdefgh"  # no stop trained
  assert b"t" * 20 in bytes(t for t in stream.tokens.tolist() if t < 256)
  assert "2 truncated, 0 dropped (train.long_rows=truncate); 1 truncated rows kept no completion" in stats.describe(T)
  stream, stats = build_stream(rows, BYTE, T, long_rows="drop")
  assert (stats.truncated, stats.dropped) == (0, 2) and stream.tokens[:3].tolist() == [*b"ab", EOS]
  with pytest.raises(ValueError, match="long_rows='keep'"):
    build_stream(rows, BYTE, T, long_rows="keep")


@settings(max_examples=40, deadline=None)
@given(
  lengths=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12), st.booleans()), min_size=1, max_size=12),
  T=st.integers(4, 16),
)
def test_sft_rows_never_straddle_two_sequences(lengths, T):
  """Each SFT row (its tokens and closing eos) lies inside one window of T+1 tokens at stride T, so
  its completion always sees its whole prompt; padding is untrained empty documents; the rows keep
  their order and their masks."""
  assume(not all(text for _, _, text in lengths))  # text alone is the pretraining stream (tested above)
  rows = [
    Row("text", "t" * (p + c), "f") if text else Row("completion", ("p" * p, "c" * c), "f") for p, c, text in lengths
  ]
  stream, stats = build_stream(rows, BYTE, T)
  tokens, loss, ends = stream.tokens, stream.loss_mask, stream.doc_ends
  starts = np.r_[0, np.flatnonzero(ends)[:-1] + 1]
  for s, e in zip(starts, np.flatnonzero(ends)):
    if tokens[s] != ord("t"):  # an SFT row (or padding): inside the window it starts in
      assert e <= s // T * T + T, (s, e)
  want_tok, want_loss = [], []
  for p, c, text in lengths:
    if text:
      want_tok += [ord("t")] * (p + c) + [EOS]
      want_loss += [1] * (p + c + 1)
    else:
      cut = max(0, p + c - T)
      n_c = max(0, c - cut)
      want_tok += [ord("p")] * min(p, T) + [ord("c")] * n_c + [EOS]
      want_loss += [0] * min(p, T) + [1] * n_c + [int(cut == 0)]
  pad = (tokens == EOS) & ~loss & ends & np.r_[False, ends[:-1]]  # lone untrained eos after a document end
  assert pad.sum() == stats.pad_tokens
  assert (tokens[~pad].tolist(), loss[~pad].astype(int).tolist()) == (want_tok, want_loss)
  assert stats.truncated == sum(not text and p + c > T for p, c, text in lengths)


# --- batches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("eos_id", [None, EOS])
def test_batches_carry_the_loss_mask_and_document_ends(eos_id):
  T = 48
  rows = [Row("messages", CHAT[1:3], "f:1"), Row("completion", ("q?", "answer"), "f:2"), Row("messages", CHAT, "f:3")]
  stream, stats = build_stream(rows * 20, BYTE, T, long_rows="drop")
  assert stats.dropped == 20  # the whole CHAT is longer than T
  train, ev = split_train_eval(stream, eval_fraction=0.2, min_eval_tokens=0, align=T)
  assert len(train) % T == 0 and np.array_equal(np.r_[train.tokens, ev.tokens], stream.tokens)
  loader = PackedBatches(train.tokens, T, 4, seed=1, eos_id=eos_id, **train.streams())
  for _ in range(3):
    order = loader._epoch_order(loader.epoch)[loader.index : loader.index + 4]
    b = next(loader)
    for row, w in enumerate(order):
      span = slice(w * T, w * T + T + 1)
      want = train.loss_mask[span][1:].astype(np.int32)
      if eos_id is not None:
        want = want * ~train.doc_ends[span][:-1]
        seg = np.cumsum(train.doc_ends[span][:-1]) - train.doc_ends[span][:-1]
        assert np.array_equal(b["segment_ids"][row], seg)
      assert np.array_equal(b["mask"][row], want) and b["mask"].dtype == np.int32 and want.any()
  # a fresh iterator restored at a state gives the same next batch, mask included
  state, nxt = loader.state(), next(loader)
  again = PackedBatches(train.tokens, T, 4, seed=1, eos_id=eos_id, **train.streams())
  again.restore(state)
  assert all(np.array_equal(v, nxt[k]) for k, v in next(again).items())
  (first,) = eval_batches(ev.tokens, T, 2, 1, eos_id=eos_id, **ev.streams())
  want = ev.loss_mask[1 : T + 1] * (True if eos_id is None else ~ev.doc_ends[:T])
  assert np.array_equal(first["mask"][0], want)
  with pytest.raises(ValueError, match="loss_mask has shape"):
    PackedBatches(train.tokens, 32, 4, loss_mask=train.loss_mask[:-1])


def test_split_keeps_streams_together_and_aligns():
  s = TokenStream(np.arange(1000, dtype=np.int32), np.arange(1000) % 2 == 0, np.arange(1000) % 7 == 0)
  train, ev = split_train_eval(s, eval_fraction=0.05, min_eval_tokens=0, align=64)
  assert len(train) == 896 and len(ev) == 104  # 950 rounded down to a multiple of 64
  assert np.array_equal(ev.loss_mask, s.loss_mask[896:]) and np.array_equal(ev.doc_ends, s.doc_ends[896:])
  a, b = split_train_eval(np.arange(1000), eval_fraction=0.05, min_eval_tokens=0)
  assert (len(a), len(b)) == (950, 50)
