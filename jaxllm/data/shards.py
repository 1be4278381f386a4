"""Prepared token shards on disk: the format `python -m jaxllm.data.prepare` writes and training
streams from (`train.data=DIR`).

A prepared directory holds memory-mapped token arrays with a document index, the layout of Megatron's
indexed datasets and nanoGPT's token files, so a window of tokens is one slice of a file and nothing is
decoded on the read path:

  DIR/manifest.json          written last: {"format", "version", "dtype", "tokenizer": {...}, "shards":
                             [{"name", "tokens", "documents"}], "tokens", "documents", "text_bytes",
                             "inputs"}. A directory without it is an unfinished preparation.
  DIR/shard-00000.bin        tokens [N] of `dtype` (little-endian uint16 when every id fits, else
                             uint32): each document's ids followed by the tokenizer's eos id, the stream
                             jaxllm.data.corpus.tokenize_documents builds in memory.
  DIR/shard-00000.idx        int64 [documents + 1]: offsets into the shard where documents start, then N.

Shards are written to a temporary name and renamed when complete, so a shard file that exists is whole
(a truncated one, from a copy cut short, is caught by its size against the manifest).

Shapes: the package legend in jaxllm/__init__.py; N = tokens in a shard or directory.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

FORMAT = "jaxllm-tokens"
VERSION = 1
MANIFEST = "manifest.json"


def shard_name(i: int) -> str:
  """The i-th shard's token file name (its index is the same name with .idx)."""
  return f"shard-{i:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (2 bytes a token, as nanoGPT stores GPT-2's 50k vocabulary), else uint32."""
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokenizer_fingerprint(tokenizer) -> dict:
  """What identifies a tokenizer's ids: {"kind", "sha256", "vocab_size", "eos_id"}. The byte tokenizer
  has a fixed name; a Hugging Face one the hash of its tokenizer.json, so two files with the same
  vocabulary size but different merges are told apart."""
  path = getattr(tokenizer, "path", None)
  if path is None:
    kind, digest = "byte", hashlib.sha256(repr(tokenizer).encode()).hexdigest()
  else:
    with open(path, "rb") as f:
      kind, digest = "tokenizer.json", hashlib.sha256(f.read()).hexdigest()
  return {"kind": kind, "sha256": digest, "vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id)}


def write_shard(directory: str, i: int, docs: list[np.ndarray], eos_id: int, dtype) -> dict:
  """Write shard i of `docs` (each an integer id array; eos_id is appended to each) atomically:
  -> {"name", "tokens", "documents"}, the manifest's entry for it."""
  dtype = np.dtype(dtype)
  lengths = np.fromiter((len(d) + 1 for d in docs), np.int64, len(docs))
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
  tokens = np.empty(int(offsets[-1]), dtype)
  ends = offsets[1:] - 1
  for start, doc in zip(offsets[:-1], docs):
    tokens[start : start + len(doc)] = doc
  tokens[ends] = eos_id
  name = shard_name(i)
  for suffix, array in ((".idx", offsets), (".bin", tokens)):  # .bin last: it marks the shard done
    path = os.path.join(directory, name[: -len(".bin")] + suffix)
    with open(path + ".tmp", "wb") as f:
      f.write(array.tobytes())
    os.replace(path + ".tmp", path)
  return {"name": name, "tokens": len(tokens), "documents": len(docs)}


def write_manifest(directory: str, tokenizer, shards: list[dict], text_bytes: int, inputs: list[str]) -> dict:
  """The manifest over finished shards, written atomically (last: it marks the directory complete)."""
  fp = tokenizer_fingerprint(tokenizer)
  manifest = {
    "format": FORMAT,
    "version": VERSION,
    "dtype": token_dtype(fp["vocab_size"]).name,
    "tokenizer": fp,
    "shards": shards,
    "tokens": sum(s["tokens"] for s in shards),
    "documents": sum(s["documents"] for s in shards),
    "text_bytes": int(text_bytes),
    "inputs": list(inputs),
  }
  path = os.path.join(directory, MANIFEST)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(path + ".tmp", path)
  return manifest


def is_prepared(path: str) -> bool:
  """Whether `path` is a directory `prepare` finished (it has a manifest)."""
  return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(directory: str) -> dict:
  """The manifest, checked for format and version; a ValueError that names the file otherwise."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ValueError(
      f"{directory} has no {MANIFEST}: it is not a prepared token directory, or its preparation did not "
      f"finish. Run `python -m jaxllm.data.prepare INPUT... --out {directory}` (it resumes where it stopped)"
    )
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); prepare the directory again") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} manifest; prepare the directory with jaxllm.data.prepare")
  if manifest.get("version") != VERSION:
    raise ValueError(
      f"{path} is version {manifest.get('version')} of the format; this jaxllm reads version {VERSION}. "
      "Prepare the directory again with this version"
    )
  return manifest


class TokenShards:
  """A prepared directory as one read-only token stream [N] over its shards: len(), read(start, stop)
  and windows(starts, length) return int32 copies, so host memory holds only what is read, whatever
  the corpus size. Reads are positioned reads (pread), not a memory map: every page of a mapped file
  that a read touches stays in the process's resident set, and on kernels whose page cache holds large
  folios a touched window maps up to 2 MB, so the RSS of a run that maps its shards climbs toward the
  corpus size (nanoGPT re-creates its np.memmap every batch for the same reason). Opening checks every
  shard against the manifest (present, size) and, given a tokenizer, that the shards were written by it."""

  def __init__(self, directory: str, tokenizer=None):
    self.directory = directory
    self.manifest = read_manifest(directory)
    self.dtype = np.dtype(self.manifest["dtype"])
    self.eos_id = int(self.manifest["tokenizer"]["eos_id"])
    if tokenizer is not None:
      self.check_tokenizer(tokenizer)
    self._files, sizes = [], []
    for entry in self.manifest["shards"]:
      path = os.path.join(directory, entry["name"])
      want = int(entry["tokens"]) * self.dtype.itemsize
      have = os.path.getsize(path) if os.path.isfile(path) else None
      if have != want:
        found = "is missing" if have is None else f"has {have:,} bytes"
        raise ValueError(
          f"shard {path} {found}; the manifest says {entry['tokens']:,} tokens ({want:,} bytes). The "
          f"directory is damaged (a copy cut short?): copy it again or prepare it again"
        )
      self._files.append(open(path, "rb", buffering=0))  # closed with this object
      sizes.append(int(entry["tokens"]))
    self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # shard k holds [starts[k], starts[k+1])

  def check_tokenizer(self, tokenizer) -> None:
    """A ValueError naming the manifest when `tokenizer` is not the one the shards were written with."""
    want, have = self.manifest["tokenizer"], tokenizer_fingerprint(tokenizer)
    if want != have:
      diff = ", ".join(f"{k} {want.get(k)!r} there, {have[k]!r} here" for k in have if want.get(k) != have[k])
      raise ValueError(
        f"{os.path.join(self.directory, MANIFEST)} was written by another tokenizer ({diff}). Train with the "
        "tokenizer the directory was prepared with (train.tokenizer=...), or prepare the data again with this one"
      )

  @property
  def num_documents(self) -> int:
    return int(self.manifest["documents"])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) as int32, across shard boundaries."""
    if not 0 <= start <= stop <= len(self):
      raise IndexError(f"tokens [{start}, {stop}) are outside [0, {len(self)}) of {self.directory}")
    parts, k = [], int(np.searchsorted(self.starts, start, side="right") - 1)
    while start < stop:
      end = min(stop, int(self.starts[k + 1]))
      parts.append(self._read_shard(k, start - int(self.starts[k]), end - start))
      start, k = end, k + 1
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

  def _read_shard(self, k: int, offset: int, count: int) -> np.ndarray:
    """count tokens of shard k from token `offset`, in the shard's dtype."""
    size = self.dtype.itemsize
    data = os.pread(self._files[k].fileno(), count * size, offset * size)
    if len(data) != count * size:
      raise ValueError(
        f"shard {self._files[k].name} ended {len(data):,} bytes into a read of {count * size:,} at byte "
        f"{offset * size:,}: it was cut short while in use; copy the directory again or prepare it again"
      )
    return np.frombuffer(data, self.dtype)

  def windows(self, starts, length: int) -> np.ndarray:
    """int32 [len(starts), length]: the tokens [s, s + length) for each start s."""
    starts = np.asarray(starts, np.int64).reshape(-1)
    out = np.empty((len(starts), length), np.int32)
    for row, s in enumerate(starts):
      out[row] = self.read(int(s), int(s) + length)
    return out

  def __repr__(self) -> str:
    return f"TokenShards({self.directory!r}, {len(self):,} tokens, {len(self._files)} shards, {self.dtype.name})"
