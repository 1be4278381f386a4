#!/usr/bin/env python
"""`python -m jaxllm.data.prepare` against its ceiling, the tokenizer's own batch encoder, on the same text.

It writes a corpus of --gb GB of jsonl documents ({"text": ...}, --file-mb files): half the Python
standard library's sources (each file a document, the files taken in turn), half prose drawn word by
word from the stdlib's own word frequencies (Zipfian, with punctuation and paragraphs), so the text is
varied rather than one string repeated (which the tokenizer's word cache would flatter). It trains a
byte-level BPE of --vocab ids on a sample of it, then measures, per tokenizer, round robin over the
corpus files (so the load of a shared machine hits both rows alike):
  ceiling   the tokenizer's own batch encoder on the documents, in one process: for BPE `tokenizers`'
            encode_batch_fast (what prepare calls: encode_batch without character offsets), its Rust
            side running a thread per core; the byte tokenizer has no batch encoder: its encode_np on
            one core. Reading and parsing the jsonl are not timed.
  prepare   the command end to end (planning, reading, JSON, tokenizing, writing shards) with its
            defaults (BPE: one process, the tokenizer's threads on every core; byte: a process a core).
Then, on the first --split-mb MB, the ways to split the cores between processes and tokenizer threads:
a process a core with one thread each, one process with a thread a core, and a process a core each
with a thread a core (oversubscribed).
Columns: MB/s of text (UTF-8 bytes of the documents), share of the ceiling, text bytes per token and
shard bytes (.bin + .idx) per token. The corpus and shards are deleted at the end unless --keep.

  python benchmarks/bench_prepare.py --gb 0.1          # a quick look
  python benchmarks/bench_prepare.py --gb 2            # the figure in docs/data.md
"""

import argparse
import glob
import json
import os
import re
import resource
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxllm.data import ByteTokenizer, HFTokenizer  # noqa: E402
from jaxllm.data.prepare import prepare  # noqa: E402


def stdlib_sources() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
    if "site-packages" in path:
      continue
    with open(path, encoding="utf-8", errors="replace") as f:
      out.append(f.read())
  return out


def prose_model(sources: list[str]):
  """(words, probabilities): the stdlib's words by frequency, each also with a comma and a full stop."""
  counts = Counter(w.lower() for text in sources[:2000] for w in re.findall(r"[A-Za-z]{2,}", text))
  words, freq = zip(*counts.most_common(50_000))
  freq = np.asarray(freq, np.float64)
  variants = [w for w in words] + [w + "," for w in words] + [w + "." for w in words] + ["\n\n"]
  probs = np.concatenate([freq * 0.85, freq * 0.07, freq * 0.07, [freq.sum() * 0.004]])
  return np.asarray(variants, dtype=object), probs / probs.sum()


def write_corpus(directory: str, total_bytes: int, file_bytes: int, seed: int = 0) -> int:
  """Writes the jsonl corpus; -> the text bytes written."""
  rng = np.random.default_rng(seed)
  sources = stdlib_sources()
  words, probs = prose_model(sources)
  text_bytes, k, files = 0, 0, 0
  while text_bytes < total_bytes:
    with open(os.path.join(directory, f"part-{files:05d}.jsonl"), "w", encoding="utf-8") as f:
      written, files = 0, files + 1
      while written < file_bytes and text_bytes < total_bytes:
        if k % 2 == 0:
          text = sources[(k // 2) % len(sources)]
        else:  # 200 to 2,000 words of prose, capitalised after each full stop
          text = " ".join(words[rng.choice(len(words), int(rng.integers(200, 2000)), p=probs)].tolist())
          text = re.sub(r"(^|\. )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
        line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        f.write(line)
        written += len(line)
        text_bytes += len(text.encode("utf-8"))
        k += 1
  return text_bytes


def read_docs(paths: list[str], batch_bytes: int = 32 << 20):
  """The documents of these jsonl files, in batches of about batch_bytes."""
  batch, size = [], 0
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line in f:
        batch.append(json.loads(line)["text"])
        size += len(batch[-1])
        if size >= batch_bytes:
          yield batch
          batch, size = [], 0
  if batch:
    yield batch


def train_bpe(directory: str, vocab: int, out: str, sample_bytes: int = 8 << 20) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  sample = next(read_docs(sorted(glob.glob(os.path.join(directory, "*.jsonl"))), sample_bytes))
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet, show_progress=False
  )
  tok.train_from_iterator(sample, trainer)
  path = os.path.join(out, "tokenizer.json")
  tok.save(path)
  return path


def cpu_seconds() -> float:
  """CPU seconds (user + system) of this process's threads and of its finished child processes."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def ceiling(path: str, tokenizer) -> tuple[float, float, int, int]:
  """(seconds, CPU seconds, text bytes, tokens): the tokenizer's own batch encoder over a file's documents."""
  seconds, cpu, text_bytes, tokens = 0.0, 0.0, 0, 0
  for batch in read_docs([path]):
    text_bytes += sum(len(t.encode("utf-8")) for t in batch)
    t0, c0 = time.perf_counter(), cpu_seconds()
    if isinstance(tokenizer, ByteTokenizer):
      tokens += sum(len(tokenizer.encode_np(t)) for t in batch)
    else:
      tokens += sum(len(e) for e in tokenizer.tokenizer.encode_batch_fast(batch, add_special_tokens=False))
    seconds, cpu = seconds + time.perf_counter() - t0, cpu + cpu_seconds() - c0
  return seconds, cpu, text_bytes, tokens


class Totals:
  """Sums over the corpus files of one row: seconds, CPU seconds, text bytes, tokens, shard bytes."""

  def __init__(self, name: str, run: str, procs: str):
    self.name, self.run, self.procs = name, run, procs
    self.seconds = self.cpu = self.text = self.tokens = self.shard = 0

  def add(self, seconds, cpu, text, tokens, shard=0):
    self.seconds += seconds
    self.cpu += cpu
    self.text += text
    self.tokens += tokens
    self.shard += shard

  def prepare(self, path, spec, out, **kwargs):
    c0 = cpu_seconds()
    s = prepare([path], spec, out, progress=False, **kwargs)
    self.procs = self.procs or f"{s['workers']}x{s['threads']}"  # the first file's (a last small one has fewer)
    self.add(s["seconds"], cpu_seconds() - c0, s["text_mb"] * 1e6, s["tokens"], s["shard_mb"] * 1e6)
    shutil.rmtree(out)

  def row(self, top) -> str:
    mbs, cpu = self.text / 1e6 / self.seconds, self.text / 1e6 / self.cpu
    shard = f"{self.shard / self.tokens:11.3f}" if self.shard else f"{'':11}"
    return (
      f"{self.name:9} {self.run:34} {self.procs:>5} {mbs:8.1f} {mbs / (top.text / 1e6 / top.seconds):8.0%} "
      f"{cpu:9.2f} {cpu / (top.text / 1e6 / top.cpu):8.0%} {self.text / self.tokens:10.2f} {shard} {self.seconds:6.0f}"
    )


HEAD = "{:9} {:34} {:>5} {:>8} {:>8} {:>9} {:>8} {:>10} {:>11} {:>6}".format(
  "tokenizer", "run", "procs", "MB/s", "of ceil", "MB/cpu-s", "of ceil", "text B/tok", "shard B/tok", "s"
)


def sample(path: str, out: str, size: int) -> str:
  """The first lines of a jsonl file, about `size` bytes, as a file of their own."""
  with open(path, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
    written = 0
    for line in f:
      if written >= size:
        break
      written += g.write(line)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gb", type=float, default=0.1, help="corpus size, GB of text")
  parser.add_argument("--vocab", type=int, default=32_000, help="BPE vocabulary")
  parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
  parser.add_argument("--keep", action="store_true", help="keep the corpus and shards")
  parser.add_argument("--reuse", action="store_true", help="use the corpus and tokenizer already in --dir")
  parser.add_argument("--file-mb", type=float, default=256, help="MB of jsonl a corpus file")
  parser.add_argument("--shard-mb", type=float, default=64, help="prepare's --shard-mb")
  parser.add_argument("--split-mb", type=float, default=64, help="MB of jsonl for the processes x threads table")
  parser.add_argument("--no-byte", action="store_true", help="skip the byte tokenizer rows")
  args = parser.parse_args()
  work = args.dir or tempfile.mkdtemp(prefix="bench_prepare_")
  corpus = os.path.join(work, "corpus")
  os.makedirs(corpus, exist_ok=True)
  cores = os.cpu_count()
  try:
    if not args.reuse:
      t0 = time.perf_counter()
      total = write_corpus(corpus, int(args.gb * 1e9), int(args.file_mb * 1e6))
      print(f"corpus: {total / 1e6:,.0f} MB of text in {time.perf_counter() - t0:.0f} s ({corpus})", flush=True)
      t0 = time.perf_counter()
      train_bpe(corpus, args.vocab, work)
      print(f"tokenizer: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    bpe = HFTokenizer(os.path.join(work, "tokenizer.json"))
    specs = [("bpe", bpe.path, bpe)] + ([] if args.no_byte else [("byte", "byte", ByteTokenizer())])
    files = sorted(glob.glob(os.path.join(corpus, "*.jsonl")))
    out = os.path.join(work, "out")
    tables = []
    for name, spec, tokenizer in specs:
      # Round robin over the corpus files, so the load of a shared machine hits both rows alike.
      top = Totals(
        name, *(("ceiling: encode_batch_fast", f"1x{cores}") if name == "bpe" else ("ceiling: encode_np", "1x1"))
      )
      run = Totals(name, "prepare", "")
      for path in files:
        top.add(*ceiling(path, tokenizer))
        run.prepare(path, spec, out, shard_mb=args.shard_mb)
        print(f"{name} {os.path.basename(path)}: {run.row(top)}", flush=True)
      tables.append((top, [top, run]))
    # How to split the cores between processes and the tokenizer's threads, on a sample.
    path = sample(files[0], os.path.join(work, "split.jsonl"), int(args.split_mb * 1e6))
    splits = ((cores, 1), (1, cores), (cores, cores))
    top = Totals("bpe", "ceiling: encode_batch_fast", f"1x{cores}")
    variants = [Totals("bpe", f"prepare --workers {w} --threads {t}", "") for w, t in splits]
    top.add(*ceiling(path, bpe))
    for v, (w, t) in zip(variants, splits):
      v.prepare(path, bpe.path, out, shard_mb=args.split_mb / cores / 2, workers=w, threads=t)
    tables.append((top, [top] + variants))
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  print(f"\n{tables[0][0].text / 1e6:,.0f} MB of jsonl text in {len(files)} files, {cores} cores")
  print("procs: processes x tokenizer threads; MB/cpu-s: text MB per CPU second (all processes, all threads)")
  print(HEAD)
  for top, rows in tables[:-1]:
    for row in rows:
      print(row.row(top))
  top, rows = tables[-1]
  print(f"\nthe first {top.text / 1e6:,.0f} MB, in shards of {args.split_mb / cores / 2:g} MB, processes x threads")
  print(HEAD)
  for row in rows:
    print(row.row(top))


if __name__ == "__main__":
  main()
