"""Tokenizers: a byte-level one that needs no files (the default) and a wrapper for a Hugging Face
`tokenizer.json`. Both expose the same small interface, which is all the rest of jaxllm relies on:

  encode(text, add_bos=False) -> list[int]     decode(ids, skip_special_tokens=True) -> str
  encode_np(text) -> int32 array                vocab_size, bos_id, eos_id, pad_id
  encode_prompt(text) -> list[int]: with the special tokens the tokenizer itself adds to an input
  chat_template: the Jinja chat template shipped with the tokenizer, or None (jaxllm.data.chat)
"""

from __future__ import annotations

import json
import os

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255 plus three specials. Any text round-trips, nothing to download, and
  the vocabulary is small enough for the tiny models the tests and CPU runs use."""

  bos_id = 256
  eos_id = 257
  pad_id = 258
  chat_template = None  # conversations use jaxllm.data.chat.DEFAULT_TEMPLATE

  @property
  def vocab_size(self) -> int:
    return 259

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [self.bos_id] + ids if add_bos else ids

  def encode_prompt(self, text: str) -> list[int]:
    """As a model input: no BOS, as jaxllm trains on byte-tokenized documents."""
    return self.encode(text)

  def encode_np(self, text: str) -> np.ndarray:
    # Fast path for whole corpora: no per-byte Python objects.
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    # Specials, and any ids a model with a padded vocab may sample above them, carry no text
    # (skipped or not).
    raw = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    # A generation can stop inside a multi-byte character; show U+FFFD rather than fail.
    return raw.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=259)"


# Special tokens of common model families, most preferred first. A tokenizer_config.json beside the
# tokenizer.json overrides these guesses.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
# "<|endoftext|>" before "<|im_end|>": for pretraining documents the document separator is wanted,
# not the chat end-of-turn marker (Qwen has both).
_EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json with the ByteTokenizer interface.

  bos_id / eos_id / pad_id are None when the vocabulary has no such token. eos falls back to bos
  (either one separates documents), and pad falls back to eos (as GPT-2 and Llama fine-tunes do).
  `encode(add_bos=True)` adds nothing when there is no bos token (Qwen models have none).
  chat_template: from chat_template.jinja, chat_template.json or tokenizer_config.json beside the
  tokenizer.json (the first that has one, as transformers looks), else None."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # imported here so the byte tokenizer never needs the package

    self.path = path
    try:
      self.tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise ValueError(
        f"could not read Hugging Face tokenizer {path!r}: {e}. Expected a tokenizer.json "
        "as written by `tokenizers` / `transformers` (save_pretrained)"
      ) from e
    named = _named_special_tokens(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    self.chat_template = find_chat_template(os.path.dirname(path))
    self.bos_id = self._find(named.get("bos_token"), _BOS_CANDIDATES)
    self.eos_id = self._find(named.get("eos_token"), _EOS_CANDIDATES)
    if self.eos_id is None:
      self.eos_id = self.bos_id
    self.pad_id = self._find(named.get("pad_token"), _PAD_CANDIDATES)
    if self.pad_id is None:
      self.pad_id = self.eos_id
    self.add_bos_token = named.get("add_bos_token")  # tokenizer_config.json's flag; None: not set

  def _find(self, named: str | None, candidates: tuple[str, ...]) -> int | None:
    # A token named in tokenizer_config.json but absent from the vocabulary is ignored (a stale
    # config), so the guess from the vocabulary still applies.
    for token in ((named,) if named else ()) + candidates:
      i = self.tokenizer.token_to_id(token)
      if i is not None:
        return i
    return None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    # add_special_tokens=False: the post-processor's own BOS/EOS would double ours.
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

  def encode_prompt(self, text: str) -> list[int]:
    """text as a model input, with the special tokens the tokenizer adds itself (transformers'
    add_special_tokens=True): those of tokenizer.json's post-processor (Llama-3's adds
    <|begin_of_text|>, Qwen2's nothing), with BOS added or removed where tokenizer_config.json sets
    add_bos_token (as Llama's and Gemma's transformers tokenizers rebuild their post-processor)."""
    ids = self.tokenizer.encode(text, add_special_tokens=True).ids
    has_bos = bool(ids) and self.bos_id is not None and ids[0] == self.bos_id
    if self.add_bos_token is True and self.bos_id is not None and not has_bos:
      ids = [self.bos_id] + ids
    elif (
      self.add_bos_token is False
      and has_bos
      and self.tokenizer.encode(text, add_special_tokens=False).ids[:1] != ids[:1]
    ):
      ids = ids[1:]
    return ids

  def encode_np(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Many documents at once; the Rust side encodes them in parallel (without the character offsets
    where the installed `tokenizers` can skip them: the same ids, faster)."""
    encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=False)]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    # Ids a model with a padded vocab may sample past the tokenizer's carry no text.
    ids = ids[(ids >= 0) & (ids < self.vocab_size)].tolist()
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def __repr__(self) -> str:
    return (
      f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
      f"eos_id={self.eos_id}, pad_id={self.pad_id})"
    )


def _named_special_tokens(config_path: str) -> dict:
  """bos/eos/pad token strings from a transformers tokenizer_config.json, if there is one (entries
  are plain strings or AddedToken dicts {"content": ...}), and its add_bos_token flag."""
  if not os.path.isfile(config_path):
    return {}
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(
      f"{config_path} is not valid JSON ({e}); fix or remove it — it only names the "
      "special tokens, which are otherwise guessed from the vocabulary"
    ) from e
  out = {}
  for key in ("bos_token", "eos_token", "pad_token"):
    value = config.get(key) if isinstance(config, dict) else None
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str) and value:
      out[key] = value
  if isinstance(config, dict) and isinstance(config.get("add_bos_token"), bool):
    out["add_bos_token"] = config["add_bos_token"]
  return out


def find_chat_template(directory: str) -> str | None:
  """The chat template (Jinja source) saved beside a tokenizer.json: chat_template.jinja, then the
  "chat_template" of chat_template.json, then of tokenizer_config.json (a list of named templates
  gives its "default")."""
  path = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  for name in ("chat_template.json", "tokenizer_config.json"):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if isinstance(template, str) and template:
      return template
  return None


def load_tokenizer(spec: str):
  """ "byte" -> ByteTokenizer; otherwise a path to a tokenizer.json or to a directory holding one."""
  if spec == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise ValueError(
      f"tokenizer {spec!r}: no file at {path}. Pass a Hugging Face tokenizer.json or a "
      'directory containing one, or "byte" for the built-in byte-level tokenizer, '
      "which needs no files"
    )
  return HFTokenizer(path)
