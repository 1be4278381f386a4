"""Packed fixed-length batches from a token stream: deterministic, infinite and resumable.

Shapes: the package legend in jaxllm/__init__.py (B = batch_size, T = seq_len).

The stream is cut into windows of T+1 tokens at stride T (window w covers tokens [w*T, w*T + T]);
inputs are a window's first T tokens and targets its last T, so every token of the stream except the
first is a target exactly once per epoch. Documents are packed back to back with their eos
separators and no padding (as GPT-2/nanoGPT train), so no compute is spent on pad tokens.

Document masks (eos_id given): each batch also carries "segment_ids" [B, T] int32, the index of an
input's document within its row (an eos closes its document; the next token opens the next one), so
the model's attention never crosses a document boundary, and "mask" [B, T] int32, 0 where the target
is the first token of a new document (its input, the previous document's eos, may not see it). With
reset_positions also "positions" [B, T] int32, restarting at 0 at each document start (and at the
row start). Train and eval batches carry the same keys.

Two optional per-token streams beside the tokens (jaxllm.data.sft builds them for SFT rows):
loss_mask [N] (1 = the token counts as a target; the prompt and template tokens of SFT rows are 0) makes
"mask" 0 wherever its target's flag is 0, with or without document masks; doc_ends [N] (1 = the token
closes its document) replaces `tokens == eos_id` as the document boundaries, for streams whose eos
also ends chat turns inside a document. Both travel with their tokens through the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The fields of a checkpointed state that must equal this run's, or the position means nothing.
_SHAPE_KEYS = ("seq_len", "batch_size", "num_tokens")


@dataclass(frozen=True)
class TokenStream:
  """Tokens [N] int32 with their optional per-token streams (loss_mask, doc_ends: bool [N], None = every
  token counts / the eos tokens end the documents). Slicing slices all three together."""

  tokens: np.ndarray
  loss_mask: np.ndarray | None = None
  doc_ends: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.tokens)

  def __getitem__(self, part: slice) -> TokenStream:
    cut = lambda a: None if a is None else a[part]  # noqa: E731
    return TokenStream(self.tokens[part], cut(self.loss_mask), cut(self.doc_ends))

  def streams(self) -> dict:
    """{"loss_mask", "doc_ends"}: the keyword arguments of PackedBatches / eval_batches."""
    return {"loss_mask": self.loss_mask, "doc_ends": self.doc_ends}


def _as_stream(tokens) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"expected a 1-D integer token stream, got shape {tokens.shape} dtype {tokens.dtype}")
  return tokens.astype(np.int32, copy=False)


def _gather(
  tokens: np.ndarray,
  windows: np.ndarray,
  seq_len: int,
  eos_id: int | None = None,
  reset_positions: bool = False,
  loss_mask: np.ndarray | None = None,
  doc_ends: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """{"inputs", "targets"} int32 [B, T] (B = len(windows), T = seq_len) for the given window numbers;
  with eos_id the document fields too (see document_fields); with loss_mask a "mask" that is 0 where
  the target's flag is 0 (combined with the document mask)."""
  index = windows[:, None] * seq_len + np.arange(seq_len + 1)  # [B, T+1]
  rows = tokens[index]
  batch = {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}
  if eos_id is not None:
    ends = None if doc_ends is None else doc_ends[index[:, :-1]]
    batch.update(document_fields(batch["inputs"], eos_id, reset_positions, ends))
  if loss_mask is not None:
    counts = loss_mask[index[:, 1:]].astype(np.int32)
    batch["mask"] = batch["mask"] * counts if "mask" in batch else counts
  return batch


def document_fields(
  inputs: np.ndarray, eos_id: int, reset_positions: bool = False, ends: np.ndarray | None = None
) -> dict[str, np.ndarray]:
  """inputs [B, T] of documents packed with eos separators -> {"segment_ids", "mask"[, "positions"]},
  each int32 [B, T]: segment_ids counts the eos before each position (an eos ends its document), mask
  is 0 where the input is an eos (its target opens the next document), positions restart at 0 after
  each eos and at the row start. ends [B, T] bool (an input closes its document), when given, marks
  the boundaries instead of `inputs == eos_id`."""
  is_eos = inputs == eos_id if ends is None else np.asarray(ends, bool)
  seg = np.cumsum(is_eos, axis=1, dtype=np.int32) - is_eos
  out = {"segment_ids": seg.astype(np.int32), "mask": (~is_eos).astype(np.int32)}
  if reset_positions:
    T = inputs.shape[1]
    t = np.arange(T, dtype=np.int32)
    start = np.concatenate([np.ones_like(is_eos[:, :1]), is_eos[:, :-1]], axis=1)  # a document starts here
    out["positions"] = (t - np.maximum.accumulate(np.where(start, t, 0), axis=1)).astype(np.int32)
  return out


def _as_flags(flags, tokens: np.ndarray, name: str) -> np.ndarray | None:
  """A per-token 0/1 stream as bool [N] (N = len(tokens)), or None."""
  if flags is None:
    return None
  flags = np.asarray(flags)
  if flags.shape != tokens.shape:
    raise ValueError(f"{name} has shape {flags.shape}; it must be one flag per token, shape {tokens.shape}")
  return flags.astype(bool, copy=False)


def _check_documents(eos_id, reset_positions: bool):
  if reset_positions and eos_id is None:
    raise ValueError(
      "reset_positions needs eos_id: positions restart at document boundaries, which the "
      "eos separators mark (turn on document masks)"
    )
  return (None if eos_id is None else int(eos_id)), bool(reset_positions)


def _check_rows(rows, batch_size: int) -> np.ndarray | None:
  """None (the whole batch) or the given row indices, checked to lie in [0, batch_size)."""
  if rows is None:
    return None
  rows = np.asarray(rows, np.int64).reshape(-1)
  if len(rows) == 0 or rows.min() < 0 or rows.max() >= batch_size:
    raise ValueError(f"rows {rows.tolist()} must be a non-empty subset of [0, {batch_size}) (batch_size={batch_size})")
  return rows


class PackedBatches:
  """Infinite iterator of {"inputs", "targets"} int32 [B, T] batches (B = batch_size, T = seq_len).

  Each epoch visits every window exactly once, in an order drawn from default_rng((seed, epoch)) (or
  in stream order with shuffle=False). Epochs run back to back: a batch that reaches the end of one
  epoch's order continues into the next, so no window is ever dropped for not filling a batch.

  state() is the position (epoch, windows of that epoch consumed) plus what it depends on;
  restore(state) on a fresh instance over the same tokens continues with exactly the next batch.

  rows (multi-host): yield only these rows (ascending indices into [0, B)) of each global batch, for a
  process that holds only part of the batch dim. The window order and state() stay global, the same
  in every process and independent of rows, so a checkpoint resumes on any process count.

  eos_id (document masks): also "segment_ids" and "mask" [B, T], and with reset_positions
  "positions" (see document_fields). loss_mask, doc_ends: per-token streams beside `tokens` (see the
  module docstring); loss_mask adds or narrows "mask".
  """

  def __init__(
    self,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    rows=None,
    eos_id: int | None = None,
    reset_positions: bool = False,
    loss_mask=None,
    doc_ends=None,
  ):
    if seq_len < 1 or batch_size < 1:
      raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
    self.tokens = _as_stream(tokens)
    self.loss_mask = _as_flags(loss_mask, self.tokens, "loss_mask")
    self.doc_ends = _as_flags(doc_ends, self.tokens, "doc_ends")
    self.seq_len, self.batch_size = int(seq_len), int(batch_size)
    self.seed, self.shuffle = int(seed), shuffle
    self.rows = _check_rows(rows, self.batch_size)
    self.eos_id, self.reset_positions = _check_documents(eos_id, reset_positions)
    if self.num_windows < self.batch_size:
      need = self.batch_size * self.seq_len + 1
      raise ValueError(
        f"{len(self.tokens):,} tokens make {self.num_windows} sequences of seq_len="
        f"{self.seq_len}, fewer than batch_size={self.batch_size}; one batch needs at "
        f"least {need:,} tokens. Add data, or lower the batch size or sequence length"
      )
    self.epoch, self.index = 0, 0
    self._order_epoch, self._order = -1, None

  @property
  def num_windows(self) -> int:
    """Sequences (windows of seq_len+1 tokens) per epoch."""
    return max(len(self.tokens) - 1, 0) // self.seq_len

  @property
  def batches_per_epoch(self) -> int:
    """Full batches per epoch (rounded down; batches straddle epoch boundaries, so none is lost)."""
    return self.num_windows // self.batch_size

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:  # one permutation per epoch, computed once
      if self.shuffle:
        self._order = np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)
      else:
        self._order = np.arange(self.num_windows)
      self._order_epoch = epoch
    return self._order

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    windows, need = [], self.batch_size
    while need:
      take = self._epoch_order(self.epoch)[self.index : self.index + need]
      windows.append(take)
      need -= len(take)
      self.index += len(take)
      if self.index == self.num_windows:
        self.epoch, self.index = self.epoch + 1, 0
    windows = np.concatenate(windows)
    return _gather(
      self.tokens,
      windows if self.rows is None else windows[self.rows],
      self.seq_len,
      self.eos_id,
      self.reset_positions,
      self.loss_mask,
      self.doc_ends,
    )

  def state(self) -> dict:
    """JSON-serialisable position, to store with a checkpoint."""
    return {
      "epoch": self.epoch,
      "index": self.index,
      "seed": self.seed,
      "seq_len": self.seq_len,
      "batch_size": self.batch_size,
      "num_tokens": len(self.tokens),
    }

  def restore(self, state: dict) -> None:
    """Continue from a state() taken on the same token stream and batch shape. The checkpoint's seed
    wins over this instance's, since the data order is part of the run being resumed."""
    missing = [k for k in ("epoch", "index", "seed", *_SHAPE_KEYS) if k not in state]
    if missing:
      raise ValueError(
        f"data loader state is missing {missing}; expected the dict from "
        f"PackedBatches.state(), got keys {sorted(state)}"
      )
    now = self.state()
    changed = [f"{k}: {state[k]} in the checkpoint, {now[k]} now" for k in _SHAPE_KEYS if int(state[k]) != now[k]]
    if changed:
      raise ValueError(
        "cannot resume the data order: " + "; ".join(changed) + ". The corpus, tokenizer "
        "or batch shape changed since the checkpoint was written; restore them, or start a "
        "fresh run (a new output directory, or resume disabled)"
      )
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index < self.num_windows:
      raise ValueError(
        f"data loader state has epoch={epoch}, index={index}; index must be in "
        f"[0, {self.num_windows}) for this stream — the state is corrupt"
      )
    self.seed, self.epoch, self.index = int(state["seed"]), epoch, index
    self._order_epoch = -1  # the seed may have changed: recompute the permutation

  def __repr__(self) -> str:
    return (
      f"PackedBatches({len(self.tokens):,} tokens, seq_len={self.seq_len}, batch_size="
      f"{self.batch_size}, {self.num_windows} windows, epoch={self.epoch}, index={self.index})"
    )


def eval_batches(
  tokens: np.ndarray,
  seq_len: int,
  batch_size: int,
  max_batches: int,
  rows=None,
  eos_id: int | None = None,
  reset_positions: bool = False,
  loss_mask=None,
  doc_ends=None,
) -> list[dict]:
  """Up to max_batches batches from the start of the stream, in order: the same set every call, so
  eval losses are comparable across steps and runs. rows: only these rows of each; eos_id,
  reset_positions, loss_mask, doc_ends: the document fields and loss mask (see PackedBatches)."""
  eos_id, reset_positions = _check_documents(eos_id, reset_positions)
  tokens = _as_stream(tokens)
  loss_mask, doc_ends = _as_flags(loss_mask, tokens, "loss_mask"), _as_flags(doc_ends, tokens, "doc_ends")
  num_windows = max(len(tokens) - 1, 0) // seq_len
  n = min(max_batches, num_windows // batch_size)
  if max_batches > 0 and n == 0:
    raise ValueError(
      f"the eval split has {len(tokens):,} tokens, too few for one batch of {batch_size} x "
      f"{seq_len} (needs {batch_size * seq_len + 1:,}); use more data, a larger eval "
      "fraction, a smaller batch, or disable eval"
    )
  windows, rows = np.arange(n * batch_size), _check_rows(rows, batch_size)
  return [
    _gather(
      tokens,
      windows[i * batch_size : (i + 1) * batch_size][slice(None) if rows is None else rows],
      seq_len,
      eos_id,
      reset_positions,
      loss_mask,
      doc_ends,
    )
    for i in range(n)
  ]


def epoch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of step `step`'s batch of items from a finite set of n: consecutive slices of a stream
  of per-epoch permutations (epoch e is permutation(n) seeded by (seed, e)), so a resumed run continues
  with the same batches from the step alone, and a batch may straddle an epoch boundary. For datasets
  of whole items (preference pairs, RL prompts) rather than a token stream."""
  pos = step * batch_size + np.arange(batch_size)
  epochs = pos // n
  perms = {int(e): np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
  return np.array([perms[int(e)][p % n] for e, p in zip(epochs, pos)], np.int64)
