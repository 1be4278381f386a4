"""jaxllm/serve/detok.py: streamed text equals a full decode, stop strings never leak, and the work
per token stays bounded. Pure Python (tokenizers built here, nothing downloaded); no jax needed."""

from __future__ import annotations

import ast
import os
import random

import pytest

from jaxllm.data.tokenizer import ByteTokenizer, HFTokenizer
from jaxllm.serve.detok import TextStream

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BYTE = ByteTokenizer()
UNICODE_TEXT = "héllo wörld — 中文字符 😀👍 ñ ok; ascii tail\n"
WORDS = [
  "the",
  "quick",
  "brown",
  "fox",
  "jumps",
  "over",
  "lazy",
  "dog",
  "héllo",
  "wörld",
  "naïve",
  "café",
  "中文",
  "字符",
  "日本語",
  "😀",
  "👍🏽",
  "ñandú",
  "—",
  "Ωmega",
  "straße",
  "ok",
  "END",
]


def stream_all(decode, ids, stops=(), prompt_ids=None, chunks=None, rng=None):
  """Push ids (one at a time, or in random chunk sizes with rng) then finish; -> (stream, deltas)."""
  s = TextStream(decode, stops, prompt_ids=prompt_ids)
  deltas, i = [], 0
  while i < len(ids):
    n = rng.randint(1, 5) if rng else 1
    deltas.append(s.push(ids[i : i + n]))
    i += n
  deltas.append(s.finish())
  return s, deltas


def random_text(rng, n_words):
  return " ".join(rng.choice(WORDS) for _ in range(n_words))


# -- the invariant: deltas concatenate to decode(all ids) --------------------------------------------


def test_byte_tokenizer_valid_text_matches_full_decode_without_replacement_chars():
  rng = random.Random(0)
  for trial in range(200):
    text = random_text(rng, rng.randint(1, 30))
    ids = BYTE.encode(text)
    s, deltas = stream_all(BYTE.decode, ids, rng=rng if trial % 2 else None)
    assert "".join(deltas) == text == s.text
    # Characters split across byte tokens are held until complete, never shown as U+FFFD.
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_split_at_every_position():
  ids = BYTE.encode(UNICODE_TEXT)
  for cut in range(len(ids) + 1):
    for cut2 in range(cut, min(len(ids), cut + 5) + 1):
      s = TextStream(BYTE.decode)
      parts = [s.push(ids[:cut]), s.push(ids[cut:cut2]), s.push(ids[cut2:]), s.finish()]
      assert "".join(parts) == UNICODE_TEXT
      assert not any("\ufffd" in p for p in parts)
      # Every delta is whole characters: a prefix of the text that ends on a character boundary.
      assert UNICODE_TEXT.startswith("".join(parts[:2]))


def test_byte_tokenizer_random_ids_match_full_decode():
  # Random bytes are mostly invalid UTF-8 and include the specials 256..258 (no text): the stream
  # must show exactly the U+FFFDs a full decode shows, and a character completed late must come
  # out whole.
  rng = random.Random(1)
  for trial in range(400):
    ids = [
      rng.choice([rng.randrange(259), rng.randrange(0x80, 0x100), rng.randrange(0x80, 0xC0)])
      for _ in range(rng.randint(0, 80))
    ]
    s, deltas = stream_all(BYTE.decode, ids, rng=rng if trial % 2 else None)
    assert "".join(deltas) == BYTE.decode(ids) == s.text


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
  ids = BYTE.encode("ab中")[:-1]
  s = TextStream(BYTE.decode)
  assert s.push(ids) == "ab"
  assert s.finish() == "\ufffd" == BYTE.decode(ids)[-1]
  assert s.finish() == ""
  with pytest.raises(ValueError):
    s.push([1])


def test_prompt_context_does_not_change_byte_level_output():
  rng = random.Random(2)
  for _ in range(100):
    prompt = BYTE.encode(random_text(rng, 3))
    prompt = prompt[: rng.randint(0, len(prompt))]  # may end inside a character
    gen = [rng.randrange(256) for _ in range(rng.randint(0, 20))] + BYTE.encode(random_text(rng, 2))
    _, deltas = stream_all(BYTE.decode, gen, prompt_ids=prompt)
    assert "".join(deltas) == BYTE.decode(gen)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A byte-level BPE (GPT-2 style) trained here on generated text, loaded through HFTokenizer.
  Merges inside CJK and emoji make tokens that end or start in the middle of a character."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  rng = random.Random(3)
  lines = [random_text(rng, rng.randint(3, 12)) for _ in range(400)]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    lines,
    trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ),
  )
  path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
  tok.save(path)
  return HFTokenizer(path)


def test_hf_byte_level_bpe_matches_full_decode(bpe):
  rng = random.Random(4)
  for trial in range(150):
    ids = bpe.encode(random_text(rng, rng.randint(1, 25)))
    s, deltas = stream_all(bpe.decode, ids, rng=rng if trial % 2 else None)
    assert "".join(deltas) == bpe.decode(ids) == s.text
    assert not any("\ufffd" in d for d in deltas)


def test_hf_byte_level_bpe_random_ids_match_full_decode(bpe):
  # Random tokens straddle characters in every way (and include the special token).
  rng = random.Random(5)
  for trial in range(300):
    ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randint(0, 60))]
    s, deltas = stream_all(bpe.decode, ids, rng=rng if trial % 2 else None)
    assert "".join(deltas) == bpe.decode(ids)


def test_sentencepiece_style_leading_space_decodes_in_prompt_context(tmp_path):
  # A Metaspace tokenizer drops the leading space of the first token it decodes: alone, " world"
  # decodes to "world"; streamed after the prompt it must keep its space.
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(
    ["hello world the quick brown fox"] * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"])
  )
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  sp = HFTokenizer(path)
  prompt, gen = sp.encode("hello"), sp.encode(" world the fox")
  assert sp.decode(gen) == "world the fox"
  _, deltas = stream_all(sp.decode, gen, prompt_ids=prompt)
  assert "".join(deltas) == " world the fox"
  _, deltas = stream_all(sp.decode, gen)  # no prompt: as decode(gen) shows it
  assert "".join(deltas) == "world the fox"
  # A special token (no text) between prompt and output must not cost the output its context.
  unk = tok.token_to_id("<unk>")
  _, deltas = stream_all(sp.decode, [unk, unk] + gen, prompt_ids=prompt)
  assert "".join(deltas) == " world the fox"


# -- stop strings ------------------------------------------------------------------------------------

VOCAB = ["hel", "lo wo", "rld", "E", "N", "D", "!", " ", "x", "EN", "D!", "aab", "a", "b", "ab"]


def words_decode(ids):
  """A toy tokenizer whose tokens are several characters, so stops can begin inside a token."""
  return "".join(VOCAB[i] for i in ids)


def test_stop_across_token_boundaries():
  s = TextStream(BYTE.decode, stops=("END",))
  deltas = [s.push([t]) for t in BYTE.encode("abcENDdef")]
  assert deltas == ["a", "b", "c", "", "", "", "", "", ""]
  assert s.stopped and s.text == "abc" and s.stop_token_index == 6
  assert s.finish() == "" and s.text == "abc"


def test_stop_at_the_very_first_token():
  s = TextStream(words_decode, stops=("hel",))
  assert s.push([0, 1]) == ""
  assert s.stopped and s.text == "" and s.stop_token_index == 1
  s = TextStream(BYTE.decode, stops=("a",))
  assert s.push(BYTE.encode("abc")) == "" and s.stopped and s.stop_token_index == 1


def test_stop_beginning_inside_a_token():
  # "hel" + "lo wo" + "rld": the stop "lo w" starts inside the second token.
  s = TextStream(words_decode, stops=("lo w",))
  assert s.push([0]) == "he"  # "l" may be the start of "lo w": held back
  assert s.push([1, 2]) == "l"
  assert s.stopped and s.text == "hel" and s.stop_token_index == 2
  # ... and one ending inside a token: the token's text after the stop is dropped too.
  s = TextStream(words_decode, stops=("o w",))
  assert s.push([0, 1, 2]) == "hell" and s.stop_token_index == 2


def test_tokens_after_the_stop_are_ignored():
  s = TextStream(words_decode, stops=("EN",))
  assert s.push([0, 9, 5, 6]) == "hel" and s.stop_token_index == 2
  assert s.push([0, 1]) == "" and s.text == "hel"


def test_overlapping_stop_candidates():
  # A stop that starts inside a longer candidate that never completes.
  s = TextStream(BYTE.decode, stops=("abcd", "bce"))
  assert s.push(BYTE.encode("xabce")) == "xa" and s.stopped
  # A stop overlapping itself: "aab" in "aaab" starts at 1.
  s = TextStream(BYTE.decode, stops=("aab",))
  deltas = [s.push([t]) for t in BYTE.encode("aaab")]
  assert deltas == ["", "", "a", ""] and s.text == "a" and s.stopped
  # Earliest occurrence wins when several stops complete in the same token.
  s = TextStream(words_decode, stops=("b", "aab"))
  assert s.push([11]) == "" and s.stopped  # "aab": "aab" starts at 0, before "b" at 2
  s = TextStream(words_decode, stops=("world", "lo"))
  assert s.push([0, 1, 2]) == "hel"


def test_multiple_stops_the_first_to_appear_ends_the_stream():
  s = TextStream(BYTE.decode, stops=("dog", " over", "zzz"))
  out = s.push(BYTE.encode("the fox jumps over the lazy dog"))
  assert out == s.text == "the fox jumps" and s.stop_token_index == len("the fox jumps over")


def test_stop_that_never_completes_is_flushed_at_finish():
  s = TextStream(BYTE.decode, stops=("END",))
  deltas = [s.push([t]) for t in BYTE.encode("the EN")]
  assert "".join(deltas) == "the " and not s.stopped
  assert s.finish() == "EN" and s.text == "the EN" and not s.stopped
  # A prefix that is then broken off is released at once, not at finish.
  s = TextStream(BYTE.decode, stops=("END",))
  assert s.push(BYTE.encode("ENx")) == "ENx"


def test_stop_completed_by_the_final_flush():
  # The last character is held (incomplete UTF-8) until finish, and completes a stop there.
  ids = BYTE.encode("ok \xe9")[:-1]  # "ok " + the first byte of "é": flushed as U+FFFD
  s = TextStream(BYTE.decode, stops=(" \ufffd",))
  assert s.push(ids) == "ok"
  assert s.finish() == "" and s.stopped and s.text == "ok"


def test_stop_with_multibyte_text_and_characters_split_across_tokens():
  text = "中文字符 and 😀 then 日本語 end"
  ids = BYTE.encode(text)
  s = TextStream(BYTE.decode, stops=("😀 th", "日本"))
  deltas = [s.push([t]) for t in ids]
  assert s.text == "中文字符 and " and s.stopped
  assert s.stop_token_index == len("中文字符 and 😀 th".encode())
  assert not any("\ufffd" in d for d in deltas)


def _expected_stream(decode, ids, stops):
  """Reference by brute force: decode every prefix; the first one containing a stop cuts at the
  earliest occurrence."""
  for n in range(1, len(ids) + 1):
    text = decode(ids[:n])
    starts = [text.find(s) for s in stops if s in text]
    if starts:
      return text[: min(starts)], n
  return decode(ids), None


def test_random_stops_match_reference_and_no_partial_stop_leaks():
  # Small alphabet so stops and their prefixes occur often. After every push the emitted text
  # must be a prefix of the reference output (nothing after a stop ever leaks) and must not
  # include a tail of the decoded text that could still grow into a stop string.
  rng = random.Random(6)
  for _ in range(400):
    ids = [rng.choice(b"abc ") for _ in range(rng.randint(0, 40))]
    stops = tuple("".join(rng.choice("abc ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3)))
    expected, index = _expected_stream(BYTE.decode, ids, stops)
    s = TextStream(BYTE.decode, stops)
    for n in range(1, len(ids) + 1):
      delta = s.push(ids[n - 1 : n])
      emitted = s.text
      assert expected.startswith(emitted) and emitted.endswith(delta)
      if s.stopped:
        break
      decoded = BYTE.decode(ids[:n])
      for stop in stops:
        for k in range(1, len(stop)):
          if decoded.endswith(stop[:k]):
            assert len(emitted) <= len(decoded) - k, (decoded, emitted, stop)
    s.finish()
    assert s.text == expected and s.stop_token_index == index and s.stopped == (index is not None)


# -- cost and boundary -------------------------------------------------------------------------------


class CountingDecode:
  def __init__(self, decode):
    self.decode, self.calls, self.ids, self.longest = decode, 0, 0, 0

  def __call__(self, ids):
    self.calls += 1
    self.ids += len(ids)
    self.longest = max(self.longest, len(ids))
    return self.decode(ids)


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_work_per_token_is_bounded_over_a_long_stream(name, bpe):
  tok = BYTE if name == "byte" else bpe
  rng = random.Random(7)
  ids = []
  while len(ids) < 2000:
    ids += tok.encode(random_text(rng, 20) + " ")
  ids = ids[:2000]
  counter = CountingDecode(tok.decode)
  # A long stop whose prefixes ("the ", "the q") keep appearing but which never completes.
  s = TextStream(counter, stops=("the quick brown cat", "zz"), prompt_ids=tok.encode("prompt text"))
  out, per_token = [], []
  for t in ids:
    before = counter.ids
    out.append(s.push([t]))
    per_token.append(counter.ids - before)
  out.append(s.finish())
  assert "".join(out) == tok.decode(ids)
  # A window of a few tokens, a few decodes per token: independent of how long the output is.
  assert counter.longest <= 16
  assert max(per_token) <= 64
  assert counter.calls <= 3 * len(ids) + 10
  assert max(per_token[-200:]) <= max(per_token[:200]) + 16  # no growth along the stream
  assert len(s._pending) < len("the quick brown cat")  # held stop text stays bounded


def test_window_stays_bounded_on_endless_invalid_utf8():
  # Every prefix of these streams ends in U+FFFD (a lead byte the next byte does not continue),
  # so "hold until the character completes" alone would decode an ever longer window.
  rng = random.Random(8)
  streams = [
    [0xE4] * 2000,
    [rng.choice([0xE4, 0xF0, 0xC3, 0x80, 0xB8]) for _ in range(2000)],
    (BYTE.encode("中") + [0xE4]) * 500,
  ]
  for ids in streams:
    counter = CountingDecode(BYTE.decode)
    s, deltas = stream_all(counter, ids)
    assert "".join(deltas) == BYTE.decode(ids)
    assert counter.longest <= 16 and counter.calls <= 12 * len(ids)


def test_module_imports_nothing_but_the_standard_library():
  path = os.path.join(ROOT, "jaxllm", "serve", "detok.py")
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported.add((node.module or ".").split(".")[0] if not node.level else ".")
  assert imported <= {"__future__", "typing", "collections"}, imported


def test_tokens_without_text_keep_the_work_per_token_bounded():
  # Runs of tokens that decode to "" (skipped special tokens) used to stay in the window, so each
  # one decoded a longer window: quadratic in the run's length.
  ids = BYTE.encode("héllo ") + [BYTE.eos_id] * 3000 + BYTE.encode("wörld") + [BYTE.pad_id] * 3000 + BYTE.encode("!")
  counter = CountingDecode(BYTE.decode)
  s, deltas = stream_all(counter, ids, prompt_ids=BYTE.encode("prompt"))
  assert "".join(deltas) == BYTE.decode(ids) == "héllo wörld!"
  assert counter.longest <= 16 and counter.ids <= 8 * len(ids)
  # ... also inside a character whose bytes are still coming
  ids = BYTE.encode("中")
  ids = ids[:1] + [BYTE.eos_id] * 3000 + ids[1:] + [BYTE.eos_id] * 3000
  counter = CountingDecode(BYTE.decode)
  s, deltas = stream_all(counter, ids)
  assert "".join(deltas) == "中" and counter.longest <= 16 and counter.ids <= 8 * len(ids)


def test_special_token_keeps_the_context_of_the_text_after_it(bpe):
  # Byte-level BPE: a run of special tokens (left out of the window) between two pieces of text.
  ids = bpe.encode("ok ") + [bpe.eos_id] * 50 + bpe.encode("héllo")
  _, deltas = stream_all(bpe.decode, ids)
  assert "".join(deltas) == bpe.decode(ids)


class SpecialDecode:
  """words_decode plus one special token (id 99, text "<|eot|>") that decoding skips by default."""

  def __call__(self, ids, skip_special_tokens=True):
    return "".join(("" if skip_special_tokens else "<|eot|>") if i == 99 else VOCAB[i] for i in ids)


def test_stop_string_of_a_special_token_matches_while_specials_are_skipped():
  s = TextStream(SpecialDecode(), stops=("<|eot|>",))
  assert s.push([0, 1]) == "hello wo" and s.push([99]) == "" and s.stopped and s.stop_token_index == 3
  assert s.push([2]) == "" and s.text == "hello wo"
  # held stop-prefix text before it is released; include_stop_str_in_output shows the stop
  s = TextStream(SpecialDecode(), stops=("<|eot|>", "rld!"), include_stop_str_in_output=True)
  assert s.push([0, 2]) == "hel" and s.push([99]) == "rld<|eot|>" and s.stopped
  # skip_special_tokens=False: the text shows the special token, and the stop matches as text
  s = TextStream(SpecialDecode(), stops=("ot|>",), skip_special_tokens=False)
  assert s.push([0, 99, 2]) == "hel<|e" and s.stopped
  s = TextStream(SpecialDecode(), skip_special_tokens=False)
  assert s.push([0, 99, 2]) == "hel<|eot|>rld"


def test_include_stop_str_in_output_and_min_tokens():
  s = TextStream(BYTE.decode, stops=("END",), include_stop_str_in_output=True)
  assert s.push(BYTE.encode("abENDcd")) == "abEND" and s.text == "abEND" and s.stop_token_index == 5
  # min_tokens: a stop string counts only once more than min_tokens tokens were pushed (vLLM)
  s = TextStream(BYTE.decode, stops=("a",), min_tokens=3)
  assert s.push(BYTE.encode("aaaab")) == "aaa" and s.stopped and s.stop_token_index == 4
  s = TextStream(BYTE.decode, stops=("ab",), min_tokens=2)
  assert s.push(BYTE.encode("abab")) == "ab" and s.stop_token_index == 4
  s = TextStream(SpecialDecode(), stops=("<|eot|>",), min_tokens=1)
  assert s.push([99, 0, 99]) == "hel" and s.stop_token_index == 3
