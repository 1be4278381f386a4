"""Training rows -> one token stream with a loss mask: pretraining text and SFT examples, mixed freely.

Row formats (one JSON object per line of a .jsonl file; a .txt file is one text row):

  {"text": "..."}                                    every token is trained (pretraining, as before)
  {"prompt": "...", "completion": "..."}             only the completion (and its closing eos) is trained
  {"messages": [{"role": "...", "content": "..."}]}  only the assistant turns are trained

Each row needs exactly one of "text", "messages" or "prompt" (with "completion"); other keys are
ignored. A malformed row is a ValueError naming file:line and what is wrong.

Tokens: each row's ids and then the eos id, which closes the row's document (the document masks'
boundary; `doc_ends` marks these closing tokens, so an eos a chat template writes inside a
conversation, e.g. a Qwen tokenizer's "<|im_end|>" named as eos, does not split it). A prompt /
completion row is encode(prompt) + encode(completion) + eos, encoded apart (the prompt as the server
encodes a prompt), the eos trained with the completion, so the model learns to stop. A messages row is
its conversation rendered with the tokenizer's chat template (jaxllm.data.chat: the template of
tokenizer_config.json / chat_template.jinja beside tokenizer.json, else the plain DEFAULT_TEMPLATE,
"role: content" lines with an eos after each assistant turn); the trained spans are the assistant
turns as `ChatFormat.sft_segments` locates them, prefix by prefix: what rendering messages[:i+1]
adds to rendering messages[:i] with the generation prompt, for each assistant message i (content and
the template's end of turn). Its closing eos is not trained: the template's end of turn is the stop.

Layout: text rows are packed back to back, as pretraining packs them (a document may run on into the
next sequence). An SFT row never straddles two training sequences (windows of seq_len + 1 tokens at
stride seq_len, jaxllm.data.loader): when it does not fit in the rest of the current window it starts
at the next one, the gap filled with eos tokens that are never trained (empty documents). Rows
longer than seq_len tokens (not counting the closing eos) follow `long_rows`: "truncate" keeps the
first seq_len tokens (the start, as TRL truncates; the closing eos is then not trained, since the
completion did not end) and "drop" leaves the row out; either way they are counted (SFTStats).

A stream of text rows only is exactly jaxllm.data.corpus.tokenize_documents' (no loss mask, the eos
tokens as boundaries), so pretraining runs are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jinja2
import numpy as np

from jaxllm.data.chat import ChatFormat
from jaxllm.data.corpus import data_files, encode_texts, jsonl_records, read_text, tokenize_documents
from jaxllm.data.loader import TokenStream

LONG_ROWS = ("truncate", "drop")
KINDS = ("text", "completion", "messages")


class Row(NamedTuple):
  """One training example: kind "text" (data = the text), "completion" (data = (prompt, completion))
  or "messages" (data = the list of messages); where = "file:line" (or the file) for errors."""

  kind: str
  data: object
  where: str


def parse_row(record, where: str) -> Row:
  """The Row of one decoded jsonl record, or a ValueError naming `where` and what is wrong."""
  formats = '{"text"}, {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}'
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object ({formats}), found a {type(record).__name__}")
  present = [k for k in ("text", "prompt", "messages") if k in record]
  if not present and "completion" in record:
    present = ["prompt"]  # reported below as the missing prompt
  if len(present) != 1:
    raise ValueError(
      f"{where}: a row needs exactly one of {formats}; it has keys {', '.join(map(repr, sorted(record))) or 'none'}"
    )
  if present == ["text"]:
    if not isinstance(record["text"], str):
      raise ValueError(f"{where}: 'text' must be a string, found {type(record['text']).__name__}")
    return Row("text", record["text"], where)
  if present == ["prompt"]:
    for key in ("prompt", "completion"):
      if not isinstance(record.get(key), str):
        found = "nothing" if key not in record else f"a {type(record[key]).__name__}"
        raise ValueError(f"{where}: a prompt/completion row needs a string {key!r}, found {found}")
    return Row("completion", (record["prompt"], record["completion"]), where)
  messages = record["messages"]
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"{where}: messages[{i}] must be an object with a string 'role' and a string 'content'")
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where}: the conversation has no 'assistant' message, so nothing to train on")
  return Row("messages", messages, where)


def _read_rows(path: str) -> list[Row]:
  return [parse_row(record, where) for where, record in jsonl_records(path)]


def load_rows(paths: list[str]) -> list[Row]:
  """The rows of .txt files (one text row each), .jsonl files (a row per non-empty line), directories
  (all *.txt / *.jsonl below, sorted) and globs, in order."""
  rows = []
  for file in data_files(paths):
    rows += _read_rows(file) if file.endswith(".jsonl") else [Row("text", read_text(file), file)]
  return rows


@dataclass
class SFTStats:
  """Counts of one stream: rows per kind, SFT rows longer than seq_len (truncated or dropped; those
  truncated to no trained token), assistant turns the template did not let us locate (masked out),
  and the eos padding that keeps SFT rows inside one sequence."""

  rows: dict
  long_rows: str = "truncate"
  truncated: int = 0
  dropped: int = 0
  emptied: int = 0
  turns_missed: int = 0
  pad_tokens: int = 0
  trained_tokens: int = 0
  tokens: int = 0

  @property
  def sft_rows(self) -> int:
    return self.rows.get("completion", 0) + self.rows.get("messages", 0)

  def describe(self, seq_len: int) -> str:
    kinds = ", ".join(f"{self.rows.get(k, 0):,} {k}" for k in KINDS)
    line = (
      f"data: {kinds} rows; {self.trained_tokens:,} of {self.tokens:,} tokens trained; SFT rows longer than "
      f"seq_len={seq_len}: {self.truncated:,} truncated, {self.dropped:,} dropped (train.long_rows={self.long_rows})"
    )
    if self.emptied:
      line += f"; {self.emptied:,} truncated rows kept no completion token"
    if self.turns_missed:
      line += f"; {self.turns_missed:,} assistant turns not located by the chat template (not trained)"
    return line + f"; {self.pad_tokens:,} padding tokens"


def _row_pieces(row: Row, chat: ChatFormat | None) -> tuple[list[tuple[str | int, bool]], int]:
  """-> ([(text to encode or a special id, trained)], assistant turns missed) of an SFT row."""
  if row.kind == "completion":
    prompt, completion = row.data
    return [(prompt, False), (completion, True)], 0
  try:
    segments, missed = chat.sft_segments(row.data)
  except jinja2.TemplateError as e:
    raise ValueError(f"{row.where}: the chat template rejected this conversation: {e}") from None
  except ValueError as e:
    raise ValueError(f"{row.where}: {e}") from None
  if not any(trained for _, trained in segments):
    raise ValueError(
      f"{row.where}: no assistant turn of this conversation could be located: the chat template renders "
      "its prefixes differently from the whole conversation (a template that rewrites earlier turns)"
    )
  return [(piece, trained) for text, trained in segments for piece in chat.pieces(text)], missed


def build_stream(
  rows: list[Row], tokenizer, seq_len: int, long_rows: str = "truncate", chat_template: str | None = None
) -> tuple[TokenStream, SFTStats]:
  """One TokenStream (tokens, loss_mask, doc_ends) of `rows` laid out for windows of seq_len, and its
  counts. chat_template: the Jinja source for messages rows; None = the tokenizer's own, else
  jaxllm.data.chat.DEFAULT_TEMPLATE. See the module docstring for the rules."""
  if long_rows not in LONG_ROWS:
    raise ValueError(f"long_rows={long_rows!r}: use one of {', '.join(LONG_ROWS)}")
  eos = tokenizer.eos_id
  if eos is None:
    raise ValueError(
      f"{tokenizer!r} has no end-of-sequence token to separate documents; name one as "
      "eos_token in the tokenizer_config.json beside tokenizer.json"
    )
  T = int(seq_len)
  stats = SFTStats(rows={k: sum(r.kind == k for r in rows) for k in KINDS}, long_rows=long_rows)
  if not stats.sft_rows:  # pretraining text only: exactly today's stream
    tokens = tokenize_documents([r.data for r in rows], tokenizer)
    stats.tokens = stats.trained_tokens = len(tokens)
    return TokenStream(tokens), stats
  chat = None
  if stats.rows["messages"]:
    chat = ChatFormat(chat_template if chat_template is not None else tokenizer.chat_template, tokenizer)
  # Every row's pieces first, then every text piece encoded in one batch.
  pieces = []
  for row in rows:
    if row.kind == "text":
      pieces.append([(row.data, True)])
    else:
      row_pieces, missed = _row_pieces(row, chat)
      stats.turns_missed += missed
      pieces.append(row_pieces)
  texts = [p for row_pieces in pieces for p, _ in row_pieces if isinstance(p, str)]
  encoded = iter(encode_texts(texts, tokenizer))
  toks, loss, ends, pos = [], [], [], 0

  def put(t, lm, de):
    nonlocal pos
    toks.append(t)
    loss.append(lm)
    ends.append(de)
    pos += len(t)

  for row, row_pieces in zip(rows, pieces):
    ids = [np.array([p], np.int32) if isinstance(p, int) else next(encoded) for p, _ in row_pieces]
    flags = [np.full(len(i), trained, bool) for i, (_, trained) in zip(ids, row_pieces)]
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    flags = np.concatenate(flags) if flags else np.zeros(0, bool)
    if row.kind == "text":
      t = np.append(ids, np.int32(eos))
      put(t, np.ones(len(t), bool), t == eos)
      continue
    closing = row.kind == "completion"  # the eos closing a completion is its stop; a chat's is the template's
    if len(ids) > T:
      if long_rows == "drop":
        stats.dropped += 1
        continue
      stats.truncated += 1
      ids, flags, closing = ids[:T], flags[:T], False
      stats.emptied += not flags.any()
    n = len(ids) + 1
    if pos % T + n > T + 1:  # would straddle two windows: pad with empty documents up to the next one
      gap = T - pos % T
      stats.pad_tokens += gap
      put(np.full(gap, eos, np.int32), np.zeros(gap, bool), np.ones(gap, bool))
    end = np.zeros(n, bool)
    end[-1] = True
    put(np.append(ids, np.int32(eos)), np.append(flags, closing), end)
  stream = TokenStream(
    np.concatenate(toks) if toks else np.zeros(0, np.int32),
    np.concatenate(loss) if loss else np.zeros(0, bool),
    np.concatenate(ends) if ends else np.zeros(0, bool),
  )
  stats.tokens, stats.trained_tokens = len(stream), int(stream.loss_mask.sum())
  return stream, stats
