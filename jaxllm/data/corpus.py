"""Corpora: the embedded default (Python's own standard library source, present on every machine
that runs jaxllm, so a first run needs no download), user .txt/.jsonl files (named as files,
directories or globs), and the step from documents to one flat token stream with a train/eval split.
jsonl rows beyond {"text"} (SFT: prompt/completion, messages) are jaxllm.data.sft's."""

from __future__ import annotations

import glob
import json
import os
import sysconfig

import numpy as np

from jaxllm.data.loader import TokenStream
from jaxllm.data.tokenizer import ByteTokenizer

# Directory names never taken into the default corpus: test suites are large, repetitive and full
# of deliberately odd code and encodings; site-packages differs between machines.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _stdlib_sources(root: str) -> list[str]:
  """Relative paths of the stdlib's .py files, sorted so the corpus is the same on every run."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    rel = os.path.relpath(dirpath, root)
    found += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")]
  # "/" separators so the order (and the headers) do not depend on the OS.
  return sorted(p.replace(os.sep, "/") for p in found)


def default_corpus_text(max_bytes: int = 8_000_000) -> str:
  """The standard library's .py sources, each preceded by "# file: path\\n", concatenated in sorted
  path order up to max_bytes of UTF-8. Deterministic for a given Python installation."""
  if max_bytes <= 0:
    raise ValueError(f"max_bytes={max_bytes} must be positive")
  root = sysconfig.get_paths()["stdlib"]
  pieces, used = [], 0
  for rel in _stdlib_sources(root):
    # errors="replace": a stray non-UTF-8 byte in some stdlib file should not stop training.
    with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
      chunk = (f"# file: {rel}\n" + f.read() + "\n").encode("utf-8")
    if used + len(chunk) >= max_bytes:
      # Cut the last file to fill the budget exactly; "ignore" drops a split multi-byte character.
      pieces.append(chunk[: max_bytes - used].decode("utf-8", errors="ignore"))
      break
    pieces.append(chunk.decode("utf-8"))
    used += len(chunk)
  if not pieces:
    raise ValueError(
      f"found no Python sources under the standard library directory {root}; pass "
      "your own corpus with train.data=PATH (.txt/.jsonl files or directories)"
    )
  return "".join(pieces)


def read_text(path: str) -> str:
  """A whole UTF-8 file; a ValueError naming the file when it is not UTF-8."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not valid UTF-8 ({e}); convert it to UTF-8 (e.g. with iconv)") from e


def jsonl_records(path: str, expected: str = "one JSON object"):
  """-> (where, record) for each non-blank line of a jsonl file, where = "path:line". A line that is
  not JSON is a ValueError naming it and what each line must be (`expected`)."""
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be {expected}") from None


def record_text(where: str, record, text_field: str, how: str = "text_field=") -> str:
  """record[text_field] of a jsonl record read at `where` ("path:line"), which must be a string; else a
  ValueError naming the line and how to choose another field (`how`)."""
  text = record.get(text_field) if isinstance(record, dict) else None
  if not isinstance(text, str):
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(
      f"{where}: expected a JSON object with a string field {text_field!r}, "
      f"found {found}; fix the line or choose the field with {how}"
    )
  return text


def _read_jsonl(path: str, text_field: str) -> list[str]:
  records = jsonl_records(path, f"one JSON object with a string field {text_field!r}")
  return [record_text(where, record, text_field) for where, record in records]


TEXT_EXTENSIONS = (".txt", ".jsonl")


def _corpus_files(directory: str, extensions: tuple[str, ...]) -> list[str]:
  files = []
  for dirpath, dirnames, filenames in os.walk(directory):
    dirnames.sort()
    files += [os.path.join(dirpath, f) for f in filenames if f.endswith(extensions)]
  return sorted(files)


def data_files(paths: list[str], extensions: tuple[str, ...] = TEXT_EXTENSIONS) -> list[str]:
  """The files named by `paths` (each ending in one of `extensions`), in order: files as given,
  directories as all such files below them (sorted), and anything else as a glob (its matches sorted)."""
  if isinstance(paths, str):
    paths = [paths]  # a lone path is an easy mistake; a str would be iterated per character
  kinds = " or ".join(extensions)
  out = []
  for path in paths:
    if os.path.isdir(path):
      files = _corpus_files(path, extensions)
      if not files:
        raise ValueError(f"data directory {path} holds no {kinds} files")
    elif os.path.isfile(path):
      files = [path]
    else:
      files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
      if not files:
        raise ValueError(
          f"data path {path!r} does not exist (and matches no files as a glob); give {kinds} "
          "files, directories or globs of them, or no data paths at all to use the embedded "
          "standard-library corpus"
        )
    for file in files:
      if not file.endswith(extensions):
        raise ValueError(f"data file {file} is not one of {kinds}; rename or convert it")
    out += files
  return out


def load_texts(paths: list[str], text_field: str = "text") -> list[str]:
  """Documents from .txt files (a whole file is one document), .jsonl files (one JSON object per
  line; the text is record[text_field]), directories (all *.txt / *.jsonl below, sorted) and globs."""
  texts = []
  for file in data_files(paths):
    if file.endswith(".jsonl"):
      texts += _read_jsonl(file, text_field)
    else:
      texts.append(read_text(file))
  return texts


def encode_texts(texts, tokenizer) -> list[np.ndarray]:
  """Each text's ids, int32 (the byte tokenizer without Python ints; a Hugging Face one in a batch,
  which its Rust side encodes in parallel)."""
  texts = list(texts)
  if isinstance(tokenizer, ByteTokenizer):
    return [tokenizer.encode_np(t) for t in texts]
  if hasattr(tokenizer, "encode_batch"):
    return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(texts)] if texts else []
  return [np.asarray(tokenizer.encode(t), dtype=np.int32) for t in texts]


def tokenize_documents(texts, tokenizer) -> np.ndarray:
  """One int32 token stream: each document's ids followed by eos_id, so the model learns where
  documents end and packing may put several into one sequence."""
  eos = tokenizer.eos_id
  if eos is None:
    raise ValueError(
      f"{tokenizer!r} has no end-of-sequence token to separate documents; name one as "
      "eos_token in the tokenizer_config.json beside tokenizer.json"
    )
  docs = encode_texts(texts, tokenizer)
  eos_arr = np.array([eos], dtype=np.int32)
  parts = [p for doc in docs for p in (doc, eos_arr)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def split_train_eval(tokens, eval_fraction: float = 0.01, min_eval_tokens: int = 8192, align: int = 1):
  """(train, eval): eval is the last max(eval_fraction of the stream, min_eval_tokens) tokens, but
  the minimum never takes more than a tenth of a small stream. The end of the stream is held out so
  the split does not depend on any seed. align: the split point is moved down to a multiple of it
  (SFT streams lay rows out in seq_len windows from the start; the eval part keeps that layout).
  tokens: an array or a TokenStream (its per-token streams are split with it)."""
  if not isinstance(tokens, TokenStream):
    tokens = np.asarray(tokens)
  cut = eval_split_point(len(tokens), eval_fraction, min_eval_tokens, align)
  return tokens[:cut], tokens[cut:]


def eval_split_point(n: int, eval_fraction: float = 0.01, min_eval_tokens: int = 8192, align: int = 1) -> int:
  """Where split_train_eval cuts a stream of n tokens (train = [0, cut), eval = [cut, n)); streamed
  sources (jaxllm.data.stream) cut theirs here without holding the tokens."""
  if not 0 <= eval_fraction < 1:
    raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
  if align < 1:
    raise ValueError(f"align={align} must be >= 1")
  n_eval = max(int(np.ceil(n * eval_fraction)), min(min_eval_tokens, n // 10))
  return (n - n_eval) // align * align
