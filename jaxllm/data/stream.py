"""Batches streamed from prepared token directories (jaxllm.data.shards): one source or a weighted
mixture (`train.data=DIR` or `train.data=DIR_A:0.7,DIR_B:0.3`), read from the memory-mapped shards
window by window, so host memory does not grow with the corpus. The batch dict is PackedBatches'.

Shapes: the package legend in jaxllm/__init__.py (B = batch_size, T = seq_len).

Windows and split: as jaxllm.data.loader and jaxllm.data.corpus.split_train_eval. Each source holds
out the tail of its tokens for eval (the same fractions); its train part [0, cut) is cut into windows
of T+1 tokens at stride T (window w covers [w*T, w*T + T]), inputs the first T, targets the last T.

Shuffle: epoch e of source s visits its n train windows in the order of a keyed permutation of
[0, n), a Feistel network (Luby-Rackoff) over the next power of 4 above n with cycle walking (values
landing in [n, 4^h) are permuted again until they fall in [0, n)), keyed by (seed, s, e). It costs
O(1) memory and is computed for just the windows a batch needs; a materialised permutation (as
PackedBatches draws) is 8 bytes a window and grows with the corpus. grain's index_shuffle does the
same, but brings grain and its dependencies for what is 20 lines here.

Mixtures: global sequence position g (sequences since the start of the run; batch i holds positions
[i*B, (i+1)*B)) maps to (source, k), k = the source's own sequence number. Positions come in blocks
of MIX_BLOCK whose per-source counts are the weights' largest-remainder shares, in an order drawn
from (seed, block); source s's k-th sequence is window perm_{seed,s,k // n}(k mod n), epoch after
epoch. So the batch at g is a pure function of (g, seed), each source's share is exact at every block
end, and a resumed run (any process count) continues with the same batches. This is Megatron's
BlendedDataset (a deterministic weighted interleaving) without its precomputed index arrays.

Eval: positions 0, 1, ... through the same mixture, source s's k-th sequence being window k of its
held-out tail, in order: the same set every call (one source: exactly loader.eval_batches).

Prefetch: a background thread assembles the next batches (queue depth `prefetch`) while the step
runs. state() is the position of the batches handed out, not of those prefetched; restore() drops the
prefetched ones; close() stops the thread.

rows (multi-host): as PackedBatches, each process reads only these rows of every global batch; the
position and state() are global.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from dataclasses import dataclass

import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data.corpus import eval_split_point
from jaxllm.data.loader import _check_documents, _check_rows, document_fields
from jaxllm.data.shards import TokenShards, is_prepared

MIX_BLOCK = 1000  # positions per mixture block: weights are exact to 0.001 at every block end
_ROUNDS = 6  # Feistel rounds (4 already make a pseudo-random permutation, Luby-Rackoff)
_SHAPE_KEYS = ("seq_len", "batch_size")


def _mix64(x: np.ndarray, key: np.uint64) -> np.ndarray:
  """splitmix64's finaliser of x ^ key (uint64, wrapping): the Feistel round function."""
  with np.errstate(over="ignore"):
    z = (x ^ key) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class WindowPermutation:
  """A keyed bijection of [0, n) evaluated elementwise: perm(i) for an int array i, O(1) memory."""

  def __init__(self, n: int, key):
    if n < 1:
      raise ValueError(f"a permutation needs n >= 1, got {n}")
    self.n = int(n)
    self.half = np.uint64((max(2, (self.n - 1).bit_length()) + 1) // 2)  # domain 4^half >= n
    self.mask = np.uint64((1 << int(self.half)) - 1)
    self.keys = np.random.default_rng(key).integers(0, 2**63, size=_ROUNDS, dtype=np.uint64)

  def _feistel(self, x: np.ndarray) -> np.ndarray:
    left, right = x >> self.half, x & self.mask
    for k in self.keys:
      left, right = right, left ^ (_mix64(right, k) & self.mask)
    return (left << self.half) | right

  def __call__(self, i) -> np.ndarray:
    i = np.asarray(i, np.int64)
    if i.size and (i.min() < 0 or i.max() >= self.n):
      raise IndexError(f"permutation indices must lie in [0, {self.n})")
    out = self._feistel(i.astype(np.uint64))
    walk = out >= self.n
    while walk.any():  # cycle walking: a bijection of [0, 4^half) restricted to [0, n)
      out[walk] = self._feistel(out[walk])
      walk = out >= self.n
    return out.astype(np.int64)


def largest_remainder(weights, total: int) -> np.ndarray:
  """int [S] counts summing to `total` in proportion to `weights` (Hamilton's method; ties to the first)."""
  w = np.asarray(weights, np.float64)
  quota = w / w.sum() * total
  counts = np.floor(quota).astype(np.int64)
  extra = np.argsort(-(quota - counts), kind="stable")[: total - counts.sum()]
  counts[extra] += 1
  return counts


class Mixture:
  """Global sequence positions -> (source, the source's own sequence number), from weights and a seed."""

  def __init__(self, weights, seed: int, block: int = MIX_BLOCK):
    self.counts = largest_remainder(weights, block)
    if (self.counts == 0).any():
      raise ConfigError(
        f"mixture weights {list(weights)} give a source no sequence in {block}; raise its weight above {1 / block}"
      )
    self.block, self.seed, self._cache, self._lock = block, int(seed), {}, threading.Lock()

  def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Block b's (source of each slot, the slot's rank among its source's slots)."""
    with self._lock:  # the prefetch thread and the consumer (consumed) both ask
      if b not in self._cache:
        if len(self.counts) == 1:
          order = np.zeros(self.block, np.int64)
        else:
          order = np.repeat(np.arange(len(self.counts)), self.counts)
          order = order[np.random.default_rng((self.seed, b, 0x6D6978)).permutation(self.block)]
        rank = np.empty(self.block, np.int64)
        for s in range(len(self.counts)):
          rank[order == s] = np.arange(self.counts[s])
        self._cache[b] = order, rank
        if len(self._cache) > 4:  # keep the few blocks in use
          self._cache.pop(next(iter(self._cache)))
      return self._cache[b]

  def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, k) int64 arrays for global positions: the k-th sequence of that source."""
    positions = np.asarray(positions, np.int64)
    source, k = np.empty_like(positions), np.empty_like(positions)
    blocks, slots = positions // self.block, positions % self.block
    for b in np.unique(blocks):
      here = blocks == b
      order, rank = self._block(int(b))
      source[here] = order[slots[here]]
      k[here] = b * self.counts[source[here]] + rank[slots[here]]
    return source, k

  def consumed(self, position: int) -> np.ndarray:
    """int [S]: sequences each source gave to positions [0, position)."""
    b, j = divmod(int(position), self.block)
    return b * self.counts + np.bincount(self._block(b)[0][:j], minlength=len(self.counts))


@dataclass
class Source:
  """One prepared directory: its shards, weight, and the split of its tokens at `cut`."""

  path: str
  weight: float
  shards: TokenShards
  cut: int  # train = tokens [0, cut), eval = [cut, N)
  seq_len: int

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.path)) or self.path

  @property
  def train_windows(self) -> int:
    return max(self.cut - 1, 0) // self.seq_len

  @property
  def eval_windows(self) -> int:
    return max(len(self.shards) - self.cut - 1, 0) // self.seq_len

  def fingerprint(self) -> str:
    """A hash of the manifest's shards and tokenizer: the data a checkpointed position refers to."""
    m = self.shards.manifest
    blob = json.dumps({"shards": m["shards"], "tokenizer": m["tokenizer"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_sources(entries) -> list[tuple[str, float | None]] | None:
  """train.data's entries as [(prepared directory, weight or None)], or None when none is a prepared
  directory (files for the in-memory path). An entry is DIR or DIR:WEIGHT (WEIGHT > 0). ConfigError
  for a bad weight, weights on some directories only, or prepared directories mixed with files."""
  out = []
  for entry in entries:
    path, weight = entry, None
    if not os.path.exists(entry) and ":" in entry:
      path, text = entry.rsplit(":", 1)
      try:
        weight = float(text)
      except ValueError:
        weight = math.nan
      if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(
          f"train.data entry {entry!r}: {text!r} is not a positive weight; write DIR:WEIGHT with a number > 0, "
          "e.g. train.data=web:0.7,code:0.3"
        )
    out.append((path, weight))
  prepared = [is_prepared(p) for p, _ in out]
  if not any(prepared):
    weighted = [f"{p}:{w:g}" for p, w in out if w is not None]
    if weighted:
      raise ConfigError(
        f"train.data {weighted}: weights apply to prepared directories (python -m jaxllm.data.prepare), "
        "and these paths are not ones"
      )
    return None
  if not all(prepared):
    raw = [p for (p, _), ok in zip(out, prepared) if not ok]
    raise ConfigError(
      f"train.data mixes prepared directories with other paths {raw}; prepare those too (python -m "
      "jaxllm.data.prepare ... --out DIR) and list the directories, or train on the files alone"
    )
  if len({w is None for _, w in out}) > 1:
    raise ConfigError(
      f"train.data {list(entries)}: give every directory a weight (DIR:WEIGHT) or none (each is then "
      "weighted by its token count)"
    )
  return out


def open_sources(entries, seq_len: int, tokenizer=None) -> list[Source]:
  """Sources of parse_sources' [(dir, weight or None)], each checked (manifest, shard sizes, and the
  tokenizer it was written with). Without weights each source weighs its train tokens."""
  sources = []
  for path, weight in entries:
    shards = TokenShards(path, tokenizer)
    cut = eval_split_point(len(shards))
    sources.append(Source(path, weight, shards, cut, int(seq_len)))
    if sources[-1].train_windows < 1:
      raise ValueError(
        f"{path} has {len(shards):,} tokens, {cut:,} of them for training: not one sequence of "
        f"seq_len={seq_len}. Add data or lower train.seq_len"
      )
  if all(w is None for _, w in entries):
    for s in sources:
      s.weight = float(s.cut)
  total = sum(s.weight for s in sources)
  for s in sources:
    s.weight = s.weight / total
  return sources


class StreamBatches:
  """Infinite iterator of PackedBatches' batch dicts, streamed from `sources` (see the module docstring).

  seed: the shuffle and mixture order; shuffle=False reads each source's windows in order (one source:
  PackedBatches(shuffle=False)'s batches). rows, eos_id, reset_positions: as PackedBatches. prefetch:
  batches assembled ahead on a background thread (0: none, each built on demand)."""

  def __init__(
    self,
    sources: list[Source],
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    rows=None,
    eos_id: int | None = None,
    reset_positions: bool = False,
    prefetch: int = 3,
  ):
    if seq_len < 1 or batch_size < 1:
      raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
    if any(s.seq_len != seq_len for s in sources):
      raise ValueError("every source must be opened with this seq_len")
    self.sources, self.seq_len, self.batch_size = list(sources), int(seq_len), int(batch_size)
    self.seed, self.shuffle, self.prefetch = int(seed), bool(shuffle), int(prefetch)
    self.rows = _check_rows(rows, self.batch_size)
    self.eos_id, self.reset_positions = _check_documents(eos_id, reset_positions)
    self.mixture = Mixture([s.weight for s in self.sources], self.seed)
    self.position = 0  # global sequences handed to the consumer
    self._thread, self._queue, self._stop = None, None, threading.Event()

  @property
  def train_tokens(self) -> int:
    return sum(s.cut for s in self.sources)

  @property
  def batches_per_epoch(self) -> int:
    """Full batches in one pass over every source's train windows (a mixture revisits some sooner)."""
    return sum(s.train_windows for s in self.sources) // self.batch_size

  def _windows(self, positions: np.ndarray, train: bool) -> np.ndarray:
    """int32 [len(positions), T+1]: the token windows at these global positions."""
    source, k = self.mixture.locate(positions)
    out = np.empty((len(positions), self.seq_len + 1), np.int32)
    for s in np.unique(source):
      here, src = source == s, self.sources[s]
      if train:
        n = src.train_windows
        epoch, i = np.divmod(k[here], n)
        w = i.copy()
        if self.shuffle:
          for e in np.unique(epoch):
            w[epoch == e] = WindowPermutation(n, (self.seed, int(s), int(e)))(i[epoch == e])
        starts = w * self.seq_len
      else:
        starts = src.cut + k[here] * self.seq_len
      out[here] = src.shards.windows(starts, self.seq_len + 1)
    return out

  def _batch(self, position: int, train: bool = True) -> dict[str, np.ndarray]:
    rows = np.arange(self.batch_size) if self.rows is None else self.rows
    windows = self._windows(position + rows, train)
    batch = {"inputs": np.ascontiguousarray(windows[:, :-1]), "targets": np.ascontiguousarray(windows[:, 1:])}
    if self.eos_id is not None:
      batch.update(document_fields(batch["inputs"], self.eos_id, self.reset_positions))
    return batch

  def eval_batches(self, max_batches: int) -> list[dict]:
    """Up to max_batches batches from the start of each source's held-out tail (module docstring)."""
    n = max_batches
    while n > 0 and any(self.mixture.consumed(n * self.batch_size) > [s.eval_windows for s in self.sources]):
      n -= 1
    if max_batches > 0 and n == 0:
      short = [f"{s.path} ({len(s.shards) - s.cut:,} tokens)" for s in self.sources]
      raise ValueError(
        f"the eval split of {', '.join(short)} is too small for one batch of {self.batch_size} x {self.seq_len} "
        "at these weights; use more data, a smaller batch, or disable eval (train.eval_every=0)"
      )
    return [self._batch(i * self.batch_size, train=False) for i in range(n)]

  # -- the consumer side: iteration, prefetch, state ---------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.prefetch <= 0:
      batch = self._batch(self.position)
    else:
      if self._thread is None:
        self._start()
      batch = self._queue.get()
      if isinstance(batch, BaseException):
        raise batch
    self.position += self.batch_size
    return batch

  def _start(self) -> None:
    self._stop.clear()
    self._queue = queue.Queue(self.prefetch)
    self._thread = threading.Thread(target=self._produce, args=(self.position,), name="data-prefetch", daemon=True)
    self._thread.start()

  def _produce(self, position: int) -> None:
    while not self._stop.is_set():
      try:
        item = self._batch(position)
      except Exception as e:  # handed to the consumer, which raises it
        item = e
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, Exception):
        return
      position += self.batch_size

  def close(self) -> None:
    """Stop the prefetch thread (a later next() starts it again from the current position)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = self._queue = None

  def consumed_tokens(self) -> dict[str, int]:
    """{source name (its path where names repeat): target tokens it gave to the batches handed out}."""
    names = [s.name for s in self.sources]
    names = names if len(set(names)) == len(names) else [s.path for s in self.sources]
    return {name: int(n) * self.seq_len for name, n in zip(names, self.mixture.consumed(self.position))}

  def describe(self) -> str:
    """One line per source: tokens, train/eval split, weight, shards."""
    return "\n".join(
      f"data {s.path}: {len(s.shards):,} tokens ({s.cut:,} train, {len(s.shards) - s.cut:,} eval) in "
      f"{len(s.shards.manifest['shards'])} shard(s), weight {s.weight:.3f}"
      for s in self.sources
    )

  def state(self) -> dict:
    """JSON-serialisable position, with what it refers to (checked by restore)."""
    return {
      "kind": "stream",
      "position": self.position,
      "seed": self.seed,
      "shuffle": self.shuffle,
      "seq_len": self.seq_len,
      "batch_size": self.batch_size,
      "sources": [
        {"path": s.path, "tokens": len(s.shards), "fingerprint": s.fingerprint(), "weight": s.weight}
        for s in self.sources
      ],
    }

  def restore(self, state: dict) -> None:
    """Continue from a state() of a run over the same sources, weights and batch shape (the sources
    may have moved: paths are not compared). The checkpoint's seed wins over this instance's, as in
    PackedBatches: the data order is part of the run being resumed."""
    if state.get("kind") != "stream":
      raise ValueError(
        "the checkpoint's data position is of in-memory data (train.data files or the embedded corpus), and "
        "this run streams prepared directories; resume with the data it was written with, or start a fresh run"
      )
    now, changed = self.state(), []
    changed += [f"{k}: {state[k]} in the checkpoint, {now[k]} now" for k in _SHAPE_KEYS if state[k] != now[k]]
    was, have = state["sources"], now["sources"]
    if len(was) != len(have):
      changed.append(f"{len(was)} source(s) in the checkpoint, {len(have)} now")
    for a, b in zip(was, have):
      for key in ("tokens", "fingerprint"):
        if a[key] != b[key]:
          changed.append(f"{b['path']}: {key} {a[key]} in the checkpoint ({a['path']}), {b[key]} now")
      if not math.isclose(a["weight"], b["weight"], rel_tol=1e-9):
        changed.append(f"{b['path']}: weight {a['weight']:.4g} in the checkpoint, {b['weight']:.4g} now")
    if changed:
      raise ValueError(
        "cannot resume the data order: " + "; ".join(changed) + ". Train on the directories, weights and "
        "batch shape the checkpoint was written with, or start a fresh run (a new train.out_dir, or "
        "train.resume=false)"
      )
    if int(state["position"]) < 0:
      raise ValueError(f"data loader state has position={state['position']}; the state is corrupt")
    self.close()
    self.position, self.seed, self.shuffle = int(state["position"]), int(state["seed"]), bool(state["shuffle"])
    self.mixture = Mixture([s.weight for s in self.sources], self.seed)

  def __repr__(self) -> str:
    names = ", ".join(f"{s.name}:{s.weight:.3f}" for s in self.sources)
    return f"StreamBatches([{names}], seq_len={self.seq_len}, batch_size={self.batch_size}, position={self.position})"
