#!/usr/bin/env python
"""Host memory and data wait of training on prepared data (train.data=DIR), side by side with the
in-memory embedded corpus: peak RSS of a `train.py` process running a few steps on a small and a large
prepared corpus (its RSS must not grow with the corpus), and the time each step waits on its batch
against the step time.

  python benchmarks/bench_data_stream.py                       # 100M and 1G tokens (200 MB, 2 GB)
  python benchmarks/bench_data_stream.py --small 10e6 --large 100e6 --steps 10   # a quick look

The corpora are generated token arrays (random byte ids in documents of random length, uint16) written
with jaxllm.data.shards.write_shard in 100 MB shards under --dir, and deleted afterwards (--keep keeps
them). Each train.py runs under a small wrapper process whose RUSAGE_CHILDREN ru_maxrss is that run's
peak RSS alone; each runs --repeat times, interleaved, and the table gives medians. Data wait: the
mean `data_wait_s` of metrics.jsonl over the steps after the first (which compiles), against the mean
step time from its `elapsed_s`. "data only": the peak RSS of a process that only opens the corpus and
streams the same batches (no jax), what the data layer itself holds.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jaxllm.data import ByteTokenizer  # noqa: E402
from jaxllm.data.shards import write_manifest, write_shard  # noqa: E402

SHARD_TOKENS = 50_000_000  # 100 MB of uint16 a shard
# Runs `train.py ARGS...` and prints the child's peak RSS (KiB) last: this process has no other child.
WRAPPER = (
  "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
  "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)

# The data layer alone (no jax): open a prepared dir, build the eval set and stream `steps` batches.
DATA_ONLY = (
  "import sys; from jaxllm.data import ByteTokenizer; "
  "from jaxllm.data.stream import StreamBatches, open_sources, parse_sources; "
  "s = StreamBatches(open_sources(parse_sources([sys.argv[1]]), 128, ByteTokenizer()), 128, 16); "
  "s.eval_batches(4); [next(s) for _ in range(int(sys.argv[2]))]; s.close()"
)


def peak_rss_mb(cmd: list[str], log_path: str) -> float:
  """Run cmd under the wrapper -> its peak RSS in MB."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  with open(log_path, "w") as log:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
  last = proc.stdout.strip().splitlines()[-1].split()
  if last[0] != "0":
    raise RuntimeError(f"{cmd[:3]} exited {last[0]}; see {log_path} and the output:\n{proc.stdout[-3000:]}")
  return int(last[1]) / 1024


def make_corpus(directory: str, tokens: int, seed: int = 0) -> str:
  """`tokens` generated tokens (documents of 1..8191 random byte ids, each closed by eos) as a prepared dir."""
  os.makedirs(directory, exist_ok=True)
  tok, rng, shards, done = ByteTokenizer(), np.random.default_rng(seed), [], 0
  with tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"writing {os.path.basename(directory)}") as bar:
    while done < tokens:
      n = min(SHARD_TOKENS, tokens - done)
      lengths = rng.integers(1, 8192, n // 4096 + 2)
      cuts = np.cumsum(lengths)
      cuts = cuts[cuts < n - len(cuts)]  # room for each document's eos
      ids = rng.integers(0, 256, n - len(cuts) - 1, dtype=np.uint16)
      shards.append(write_shard(directory, len(shards), np.split(ids, cuts), tok.eos_id, np.uint16))
      done += shards[-1]["tokens"]
      bar.update(shards[-1]["tokens"])
  write_manifest(directory, tok, shards, 0, ["generated"])
  return directory


def train_run(out: str, steps: int, data: list[str]) -> dict:
  """train.py for `steps` steps on `data` (overrides) -> {"rss_mb", "wait_ms", "step_ms"}."""
  args = ["--no-progress", f"train.steps={steps}", "train.log_every=1", "train.sample_tokens=0", f"train.out_dir={out}"]
  rss = peak_rss_mb([sys.executable, os.path.join(ROOT, "train.py"), *args, *data], out + ".log")
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  timed = [r for r in records if r["step"] > 1]
  step_s = (timed[-1]["elapsed_s"] - records[0]["elapsed_s"]) / len(timed)
  return {
    "rss_mb": rss,
    "wait_ms": 1000 * float(np.mean([r["data_wait_s"] for r in timed])),
    "step_ms": 1000 * step_s,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--small", type=float, default=100e6, help="tokens of the small corpus (uint16: 2 bytes each)")
  p.add_argument("--large", type=float, default=1e9, help="tokens of the large corpus")
  p.add_argument("--steps", type=int, default=20, help="train steps of each run")
  p.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; the table gives the medians")
  p.add_argument("--dir", default=None, help="where the corpora and runs go (default: a temporary directory)")
  p.add_argument("--keep", action="store_true", help="keep the generated corpora")
  args = p.parse_args(argv)
  root = args.dir or tempfile.mkdtemp(prefix="bench_data_stream_")
  os.makedirs(root, exist_ok=True)
  rows = []
  try:
    runs = [("embedded corpus (in memory)", None, 0)]
    for name, n in (("small", int(args.small)), ("large", int(args.large))):
      runs.append((f"prepared, {n / 1e6:,.0f}M tokens", make_corpus(os.path.join(root, name), n), n))
    train_run(os.path.join(root, "warm-up"), 2, [])  # fills the compile cache: every measured run then loads it
    results = {label: [] for label, _, _ in runs}
    for i in tqdm(range(args.repeat * len(runs)), desc="train.py runs"):
      label, data, _ = runs[i % len(runs)]
      results[label].append(
        train_run(os.path.join(root, f"run-{i}"), args.steps, [f"train.data={data}"] if data else [])
      )
    for label, data, n in runs:
      rows.append(
        {
          "label": label,
          "tokens": n,
          **{k: float(np.median([r[k] for r in results[label]])) for k in results[label][0]},
        }
      )
      rows[-1]["spread"] = max(r["rss_mb"] for r in results[label]) - min(r["rss_mb"] for r in results[label])
      rows[-1]["runs"] = [round(r["rss_mb"]) for r in results[label]]
      if data:
        cmd = [sys.executable, "-c", DATA_ONLY, data, str(args.steps)]
        rows[-1]["data_mb"] = peak_rss_mb(cmd, os.path.join(root, "data-only.log"))
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  base = rows[1]["rss_mb"]
  print(
    f"\ntrain.py, {args.steps} steps (tiny model, cpu-8 mesh, batch 16 x 128): peak host RSS and data wait, "
    f"medians of {args.repeat} runs (spread: max - min peak RSS)"
  )
  head = f"{'data':<30} {'disk MB':>8} {'peak RSS MB':>12} {'spread':>7} {'vs small':>9} {'data only':>10}"
  print(head + f" {'wait ms':>8} {'step ms':>8} {'wait %':>7}")
  for r in rows:
    disk = f"{2 * r['tokens'] / 1e6:,.0f}" if r["tokens"] else "-"
    vs = f"{100 * (r['rss_mb'] / base - 1):+.1f}%" if r["tokens"] else "-"
    data_mb = f"{r['data_mb']:,.0f}" if "data_mb" in r else "-"
    print(
      f"{r['label']:<30} {disk:>8} {r['rss_mb']:>12,.0f} {r['spread']:>7,.0f} {vs:>9} "
      f"{data_mb:>10} {r['wait_ms']:>8.2f} "
      f"{r['step_ms']:>8.1f} "
      f"{100 * r['wait_ms'] / r['step_ms']:>6.2f}%"
    )
  print("peak RSS MB of each run: " + "; ".join(f"{r['label']}: {r['runs']}" for r in rows))
  print("data only: the data layer alone (open, eval set, the same batches) in a process without jax")
  return 0


if __name__ == "__main__":
  sys.exit(main())
