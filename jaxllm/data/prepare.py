"""Tokenize a corpus once into token shards on disk (the format of jaxllm.data.shards), with every core:

  python -m jaxllm.data.prepare INPUT... --tokenizer (byte | tokenizer.json | HF dir) --out DIR

Inputs (files, directories or globs, as train.data takes them):
  .txt      one document per file, as train.data=a.txt reads it (universal newlines). A file over
            TXT_DOC_BYTES is cut into documents of at most that size at a blank line, else at a line
            end, so no worker ever holds a multi-GB file.
  .jsonl    one document per line: the string field --field (default "text").
  .parquet  Hugging Face `datasets` files on disk (the column --field); split at row groups.
  .arrow    the same, as `datasets` caches them (Arrow IPC stream or file), memory-mapped.

The work is a plan fixed at the start and saved as DIR/plan.json: chunks of about --shard-mb MB of
input (a file's byte range at line ends, or a row range), one shard each. Worker processes tokenize
the chunks with the tokenizer's batch encoder and write shard-NNNNN.bin/.idx (atomically) and
shard-NNNNN.json (its counts). A re-run with the same inputs and tokenizer skips the shards that are
complete, so an interrupted preparation resumes; manifest.json, written last, marks the directory done.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from jaxllm.data import shards
from jaxllm.data.corpus import data_files, encode_texts, record_text
from jaxllm.data.tokenizer import ByteTokenizer, load_tokenizer

EXTENSIONS = (".txt", ".jsonl", ".parquet", ".arrow")
TXT_DOC_BYTES = 1 << 20  # the largest document a .txt file is cut into
ENCODE_BATCH_BYTES = 4 << 20  # text per encode_batch call: bounds the tokenizer's per-token memory
PLAN = "plan.json"
PLAN_FORMAT = "jaxllm-prepare-plan"
PYARROW_HINT = "pip install 'jaxllm[data]'"


# --- inputs ------------------------------------------------------------------------------------


def _pyarrow(path: str):
  try:
    import pyarrow  # noqa: F401  (only .parquet/.arrow inputs need it)
  except ImportError:
    raise ValueError(f"reading {path} needs pyarrow, which is not installed: {PYARROW_HINT}") from None
  import pyarrow.compute
  import pyarrow.ipc
  import pyarrow.parquet

  return pyarrow


def _open_arrow(path: str):
  """A .arrow file as a table over its memory map (no copy): `datasets` writes the IPC stream format,
  other tools the IPC file format."""
  pa = _pyarrow(path)
  source = pa.memory_map(path)
  try:
    return pa.ipc.open_file(source).read_all()
  except pa.ArrowInvalid:
    try:
      return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid as e:
      raise ValueError(f"{path} is not an Arrow IPC file or stream ({e}); convert it to .parquet or .jsonl") from e


def _text_column(path: str, names: list[str], field: str) -> None:
  if field not in names:
    raise ValueError(f"{path} has no column {field!r} (it has {names}); choose the text column with --field")


def _decode(data: bytes, path: str, offset: int) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{path} is not valid UTF-8 (at byte {offset + e.start:,}); convert it to UTF-8 (e.g. with iconv)"
    ) from None


def _line_ends(path: str, size: int, step: int) -> list[int]:
  """Byte offsets [0, ..., size] cutting a file into pieces of about `step` bytes just after a newline."""
  cuts = [0]
  with open(path, "rb") as f:
    while cuts[-1] + step < size:
      f.seek(cuts[-1] + step)
      f.readline()  # to the end of the line the step lands in
      cuts.append(min(f.tell(), size))
  if cuts[-1] < size or size == 0:  # an empty .txt file is still a (empty) document
    cuts.append(size)
  return cuts


def _segments(path: str, field: str, step: int) -> list[dict]:
  """A file's pieces of about `step` bytes of input: {"file", "start", "stop", "bytes"}, where start/stop
  are byte offsets (.txt, .jsonl), row groups (.parquet) or rows (.arrow)."""
  if path.endswith((".txt", ".jsonl")):
    cuts = _line_ends(path, os.path.getsize(path), step)
    size = lambda a, b: b - a
  else:
    if path.endswith(".parquet"):  # the text column's bytes per row group, from the footer alone
      meta = _pyarrow(path).parquet.ParquetFile(path).metadata
      names = [meta.schema.column(j).path for j in range(meta.num_columns)]
      _text_column(path, names, field)
      j = names.index(field)
      lengths = [meta.row_group(g).column(j).total_uncompressed_size for g in range(meta.num_row_groups)]
    else:  # the text's bytes per row, from the string offsets
      table = _open_arrow(path)
      _text_column(path, table.column_names, field)
      lengths = _pyarrow(path).compute.binary_length(table.column(field)).to_numpy(zero_copy_only=False)
    sizes = np.concatenate([[0], np.cumsum(np.nan_to_num(lengths), dtype=np.int64)])
    cuts = _greedy_cuts(sizes, step)
    size = lambda a, b: int(sizes[b] - sizes[a])
  path = os.path.abspath(path)
  return [{"file": path, "start": int(a), "stop": int(b), "bytes": size(a, b)} for a, b in zip(cuts, cuts[1:])]


def _greedy_cuts(cumulative, step: int) -> list[int]:
  """Indices [0, ..., n] into items with these cumulative sizes [n + 1], each run about `step` in size."""
  cuts, n = [0], len(cumulative) - 1
  while cuts[-1] < n:
    nxt = int(np.searchsorted(cumulative, cumulative[cuts[-1]] + step, side="left"))
    cuts.append(min(max(nxt, cuts[-1] + 1), n))
  return cuts


def _split_txt(data: bytes) -> list[bytes]:
  """A .txt file's documents: the whole file, or pieces of at most TXT_DOC_BYTES, each cut after the last
  blank line in the second half of the limit, else after the last line end there, else at a character."""
  docs, start = [], 0
  while len(data) - start > TXT_DOC_BYTES:
    end, half = start + TXT_DOC_BYTES, start + TXT_DOC_BYTES // 2
    blank, line = data.rfind(b"\n\n", half, end), data.rfind(b"\n", half, end)
    cut = blank + 2 if blank >= 0 else line + 1
    if cut <= half:
      cut = end
      while data[cut] & 0xC0 == 0x80:  # not inside a multi-byte character
        cut -= 1
    docs.append(data[start:cut])
    start = cut
  return docs + [data[start:]]


def read_segment(segment: dict, field: str) -> list[str]:
  """The documents of one plan segment."""
  path, start, stop = segment["file"], segment["start"], segment["stop"]
  if path.endswith((".txt", ".jsonl")):
    try:
      with open(path, "rb") as f:
        f.seek(start)
        data = f.read(stop - start)
    except OSError as e:
      raise ValueError(f"cannot read {path} ({e.strerror})") from None
    if path.endswith(".txt"):
      _decode(data, path, start)  # checked whole, to name the offending byte
      # Universal newlines, as open(path, encoding="utf-8") reads it for train.data=a.txt.
      data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
      return [doc.decode("utf-8") for doc in _split_txt(data)]
    return _jsonl_texts(data, path, start, field)
  if path.endswith(".parquet"):
    column = _pyarrow(path).parquet.ParquetFile(path).read_row_groups(range(start, stop), columns=[field])[field]
  else:
    column = _open_arrow(path).slice(start, stop - start)[field]
  texts = column.to_pylist()
  for row, text in enumerate(texts):
    if not isinstance(text, str):
      kind = "parquet row group" if path.endswith(".parquet") else "arrow row"
      raise ValueError(
        f"{path}: column {field!r} holds {type(text).__name__} (not text) at row {row} from {kind} {start}; "
        "choose the text column with --field or drop the empty rows"
      )
  return texts


def _jsonl_texts(data: bytes, path: str, start: int, field: str) -> list[str]:
  texts = []
  for k, line in enumerate(data.split(b"\n")):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      problem = "not valid UTF-8" if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e.msg})"
      raise ValueError(f"{_where(path, start, k)}: {problem}; each line must be one JSON object") from None
    if not (isinstance(record, dict) and isinstance(record.get(field), str)):
      record_text(_where(path, start, k), record, field, how="--field")  # raises, naming the line
    texts.append(record[field])
  return texts


def _where(path: str, start: int, k: int) -> str:
  """ "path:line" of the k-th line after byte `start` (counted only to report an error)."""
  with open(path, "rb") as f:
    before = f.read(start).count(b"\n")
  return f"{path}:{before + k + 1}"


# --- the plan ----------------------------------------------------------------------------------


def make_plan(files: list[str], tokenizer, field: str, shard_mb: float) -> dict:
  """The fixed work list: chunks of about shard_mb MB of input, each [segment] of one or more files."""
  step = max(1, int(shard_mb * 1e6))
  chunks, current, size = [], [], 0
  for path in files:
    for segment in _segments(path, field, step):
      current.append(segment)
      size += segment["bytes"]
      if size >= step:
        chunks.append(current)
        current, size = [], 0
  if current:
    chunks.append(current)
  return {**_plan_key(files, tokenizer, field, shard_mb), "chunks": chunks}


def _plan_key(files: list[str], tokenizer, field: str, shard_mb: float) -> dict:
  """What the shards depend on: a saved plan is reused only when all of this is the same."""
  inputs = []
  for path in files:
    st = os.stat(path)
    inputs.append({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
  fingerprint = shards.tokenizer_fingerprint(tokenizer)
  return {"format": PLAN_FORMAT, "tokenizer": fingerprint, "field": field, "shard_mb": shard_mb, "inputs": inputs}


def _owned(name: str) -> bool:
  """Files prepare writes in its directory (the only ones --overwrite removes)."""
  return name.removesuffix(".tmp") in (PLAN, shards.MANIFEST) or (
    name.startswith("shard-") and name.endswith((".bin", ".idx", ".json", ".tmp"))
  )


def load_or_make_plan(out: str, files: list[str], tokenizer, field: str, shard_mb: float, overwrite: bool) -> dict:
  """The plan saved in `out` when it was made for these inputs and tokenizer (a resumed preparation),
  else a new one, saved (with overwrite, or in a new directory or one holding only prepare's files)."""
  os.makedirs(out, exist_ok=True)
  plan_path = os.path.join(out, PLAN)
  entries = os.listdir(out)
  if not os.path.isfile(plan_path) and not all(_owned(e) for e in entries):
    raise ValueError(
      f"--out {out} is a non-empty directory that prepare did not write (no {PLAN}); choose a new or empty directory"
    )
  if os.path.isfile(plan_path) and not overwrite:
    try:
      with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"{plan_path} is unreadable ({e}); pass --overwrite to prepare {out} again") from None
    key = _plan_key(files, tokenizer, field, shard_mb)
    changed = [k for k in key if plan.get(k) != key[k]]
    if not changed:
      return plan
    raise ValueError(
      f"{plan_path} was made for other {' and '.join(changed)} than these; pass --overwrite to prepare {out} "
      "again from scratch, or a new --out"
    )
  for name in entries:
    if _owned(name):
      os.remove(os.path.join(out, name))
  plan = make_plan(files, tokenizer, field, shard_mb)
  with open(plan_path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(plan, f, indent=1)
  os.replace(plan_path + ".tmp", plan_path)
  return plan


def finished_shard(out: str, i: int, dtype) -> dict | None:
  """Shard i's record {"name", "tokens", "documents", "text_bytes"} if it is complete on disk, else None."""
  name = shards.shard_name(i)
  base = os.path.join(out, name[: -len(".bin")])
  try:
    with open(base + ".json", encoding="utf-8") as f:
      record = json.load(f)
    ok = os.path.getsize(base + ".bin") == record["tokens"] * np.dtype(dtype).itemsize
    ok = ok and os.path.getsize(base + ".idx") == (record["documents"] + 1) * 8
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return record if ok and record.get("name") == name else None


# --- workers -----------------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(tokenizer_spec: str, field: str, out: str, threads: int | None) -> None:
  """Load the tokenizer in a worker; threads: its share of the cores for the Rust side (None: leave the
  process's settings, when the work runs in the calling process)."""
  # Each of N worker processes gets cores/N threads for the tokenizer's Rust (rayon) side, so processes
  # and threads together use every core without oversubscribing them. With one thread per process the
  # Rust side runs serially: no thread pool at all.
  if threads is not None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
  tokenizer = load_tokenizer(tokenizer_spec)
  dtype = shards.token_dtype(tokenizer.vocab_size)
  _worker.update(tokenizer=tokenizer, field=field, out=out, dtype=dtype)


def _encode(texts: list[str], tokenizer) -> list[np.ndarray]:
  """Each text's ids, in batches of about ENCODE_BATCH_BYTES of text."""
  docs, batch, size = [], [], 0
  for text in texts:
    batch.append(text)
    size += len(text)
    if size >= ENCODE_BATCH_BYTES:
      docs += encode_texts(batch, tokenizer)
      batch, size = [], 0
  return docs + encode_texts(batch, tokenizer)


def prepare_chunk(i: int, chunk: list[dict]) -> dict:
  """Read, tokenize and write chunk i as shard i -> its record."""
  tokenizer, out, dtype = _worker["tokenizer"], _worker["out"], _worker["dtype"]
  texts = [text for segment in chunk for text in read_segment(segment, _worker["field"])]
  text_bytes = sum(len(t.encode("utf-8")) for t in texts)
  entry = shards.write_shard(out, i, _encode(texts, tokenizer), tokenizer.eos_id, dtype)
  record = {**entry, "text_bytes": text_bytes}
  path = os.path.join(out, entry["name"][: -len(".bin")] + ".json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(record, f)
  os.replace(path + ".tmp", path)  # after .bin and .idx: the record marks the shard complete
  return record


def _prepare_indexed(job):
  return job[0], prepare_chunk(*job)


# --- the command -------------------------------------------------------------------------------


def check_tokenizer(tokenizer, spec: str) -> None:
  if tokenizer.eos_id is None:
    raise ValueError(
      f"tokenizer {spec} has no end-of-sequence token to separate documents; name one as eos_token in the "
      "tokenizer_config.json beside tokenizer.json"
    )
  if tokenizer.vocab_size > 1 << 32:
    raise ValueError(f"tokenizer {spec} has {tokenizer.vocab_size:,} ids; shards store ids as uint32 (at most 2**32)")


def prepare(
  inputs: list[str],
  tokenizer_spec: str,
  out: str,
  field: str = "text",
  shard_mb: float = 64,
  workers: int | None = None,
  threads: int | None = None,
  overwrite: bool = False,
  progress: bool = True,
) -> dict:
  """Prepare `inputs` into `out` (resuming a preparation there) -> the summary dict. workers: processes
  (default 1 for a tokenizer.json, one a core for the byte tokenizer; 1 runs in this process);
  threads: the tokenizer's threads in each (default cores // workers)."""
  from tqdm.auto import tqdm

  t0 = time.perf_counter()
  if not inputs:
    raise ValueError("no inputs: give .txt/.jsonl/.parquet/.arrow files, directories or globs to prepare")
  if shard_mb <= 0:
    raise ValueError(f"--shard-mb {shard_mb} must be positive")
  files = data_files(list(inputs), EXTENSIONS)
  for path in files:
    if not os.access(path, os.R_OK):
      raise ValueError(f"cannot read {path} (permission denied)")
  tokenizer = load_tokenizer(tokenizer_spec)
  check_tokenizer(tokenizer, tokenizer_spec)
  dtype = shards.token_dtype(tokenizer.vocab_size)
  plan = load_or_make_plan(out, files, tokenizer, field, shard_mb, overwrite)
  chunks = plan["chunks"]
  if overwrite and shards.is_prepared(out):
    os.remove(os.path.join(out, shards.MANIFEST))
  records = {i: r for i in range(len(chunks)) if (r := finished_shard(out, i, dtype)) is not None}
  pending = [(i, chunk) for i, chunk in enumerate(chunks) if i not in records]
  chunk_bytes = [sum(s["bytes"] for s in chunk) for chunk in chunks]
  cores = os.cpu_count() or 1
  if not workers:
    # A tokenizer.json tokenizer: one process, its Rust side on every core, which measured faster than a
    # process a core (docs/data.md). The byte tokenizer has no threads: a process a core.
    workers = cores if isinstance(tokenizer, ByteTokenizer) else 1
  workers = max(1, min(workers, len(pending) or 1))
  threads = threads or max(1, cores // workers)
  done_before = sum(chunk_bytes[i] for i in records)
  bar = tqdm(
    total=sum(chunk_bytes), initial=done_before, unit="B", unit_scale=True, desc="prepare", disable=not progress
  )
  with bar:
    if workers == 1 and threads >= cores:  # the Rust side's default: every core
      _init_worker(tokenizer_spec, field, out, None)
      results = map(_prepare_indexed, pending)
      pool = None
    else:
      pool = multiprocessing.get_context("spawn").Pool(
        workers, _init_worker, (tokenizer_spec, field, out, threads), maxtasksperchild=None
      )
      results = pool.imap_unordered(_prepare_indexed, pending)
    try:
      for i, record in results:
        records[i] = record
        bar.update(chunk_bytes[i])
    finally:
      if pool is not None:
        pool.terminate()
  entries = [records[i] for i in range(len(chunks))]
  text_bytes = sum(r["text_bytes"] for r in entries)
  manifest_shards = [{k: r[k] for k in ("name", "tokens", "documents")} for r in entries]
  manifest = shards.write_manifest(out, tokenizer, manifest_shards, text_bytes, files)
  seconds = time.perf_counter() - t0
  new_bytes = sum(records[i]["text_bytes"] for i, _ in pending)
  shard_bytes = sum(os.path.getsize(os.path.join(out, r["name"])) for r in entries)
  index_bytes = sum(8 * (r["documents"] + 1) for r in entries)
  return {
    "out": out,
    "shards": len(entries),
    "resumed": len(chunks) - len(pending),
    "documents": manifest["documents"],
    "tokens": manifest["tokens"],
    "text_mb": text_bytes / 1e6,
    "shard_mb": (shard_bytes + index_bytes) / 1e6,
    "text_bytes_per_token": text_bytes / max(1, manifest["tokens"]),
    "shard_bytes_per_token": (shard_bytes + index_bytes) / max(1, manifest["tokens"]),
    "mb_per_s": new_bytes / 1e6 / seconds,
    "seconds": seconds,
    "workers": workers,
    "threads": threads,
  }


def format_summary(s: dict) -> str:
  return (
    f"prepared {s['out']}: {s['documents']:,} documents, {s['tokens']:,} tokens in {s['shards']} shards "
    f"({s['resumed']} already done)\n"
    f"  text {s['text_mb']:,.1f} MB -> shards {s['shard_mb']:,.1f} MB; {s['text_bytes_per_token']:.2f} text bytes "
    f"and {s['shard_bytes_per_token']:.2f} shard bytes a token\n"
    f"  {s['mb_per_s']:,.1f} MB/s of text, {s['seconds']:,.1f} s with {s['workers']} workers"
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m jaxllm.data.prepare",
    description="Tokenize text/jsonl/parquet/arrow inputs once into token shards for train.data=DIR.",
  )
  parser.add_argument("inputs", nargs="+", help=".txt/.jsonl/.parquet/.arrow files, directories or globs")
  parser.add_argument("--tokenizer", default="byte", help='"byte", a tokenizer.json or a directory holding one')
  parser.add_argument("--out", required=True, help="the prepared directory (created; resumed if interrupted)")
  parser.add_argument("--field", default="text", help="the text field of .jsonl rows / column of .parquet/.arrow")
  parser.add_argument("--shard-mb", type=float, default=64, help="MB of input text per shard (the unit of work)")
  parser.add_argument(
    "--workers", type=int, default=None, help="worker processes (default: 1, or one a core with --tokenizer byte)"
  )
  parser.add_argument("--threads", type=int, default=None, help="tokenizer threads a worker (default: cores/workers)")
  parser.add_argument("--overwrite", action="store_true", help="discard a preparation in --out made otherwise")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  try:
    summary = prepare(
      args.inputs,
      args.tokenizer,
      args.out,
      field=args.field,
      shard_mb=args.shard_mb,
      workers=args.workers,
      threads=args.threads,
      overwrite=args.overwrite,
      progress=not args.no_progress,
    )
  except ValueError as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 2
  print(format_summary(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
