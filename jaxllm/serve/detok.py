"""Streaming text for one request: incremental detokenization and OpenAI `stop` strings.

Boundary: this module knows text and token ids, nothing about the engine, scheduling or HTTP. It
is given a tokenizer's `decode(ids) -> str` and the ids a request generates, a few at a time, and
hands back the text that may be shown now. The engine (or the HTTP layer on top of it) decides
what to do with the text and with `stopped`. Pure Python: no jax, nothing else of jaxllm.

Two stages, applied to each new token in turn:

1. Detokenization (the prefix_offset / read_offset scheme of vLLM). Decoding every token on its own
   is wrong (a byte-level tokenizer splits a character across tokens; a SentencePiece tokenizer
   drops the leading space of the first token it decodes), and decoding the whole output per token
   costs O(n^2). So only a short window of recent tokens, ids[prefix:], is decoded; its first
   `done` characters were passed on already and the rest is new. While the window's text ends in
   U+FFFD the last character may still be incomplete, so nothing is passed on until a later token
   completes it (or the request ends). Then the window slides: the tokens just passed on become
   the context of the next window. A token with no text of its own (a special token that decoding
   skips) is left out of the window: it cannot change any text, and keeping it would make the
   window, and the work per token, grow with every such token.

2. Stop strings. Text from stage 1 goes through a small buffer: as soon as a stop string appears,
   the text before it is passed on and the stream stops. Otherwise the longest tail of the buffer
   that could still grow into a stop string is held back, so a delta never carries the beginning
   of a stop string; `finish()` releases it when the request ends another way. As vLLM does,
   stop strings count only once more than `min_tokens` tokens were generated, and with
   `include_stop_str_in_output` the stop string itself is emitted (what follows it is not).
   A stop string that is the text of a special token (Llama-3's "<|eot_id|>") also matches when
   decoding skips special tokens: such a token is recognised by its id's own text.

Invariant: with no stop strings, the concatenation of every delta (push + finish) equals
decode(all generated ids) for byte-level UTF-8 decoders (ByteTokenizer, byte-level BPE).
"""

from __future__ import annotations

from typing import Callable, Iterable

# Prompt tokens decoded ahead of the first generated one, so it decodes as it would in context
# (SentencePiece's leading space). vLLM uses the same 5.
PROMPT_CONTEXT = 5
# Tokens a window may hold back while its text ends in U+FFFD before a split is looked for. A
# character is at most 4 UTF-8 bytes, so a held run this long usually means invalid bytes, whose
# U+FFFD is final; waiting longer would let the window (and the work per token) grow.
HOLD_TOKENS = 4

REPLACEMENT = "\ufffd"


class TextStream:
  """Incremental detokenization + stop strings for one request.

  decode: a tokenizer's decode (token ids -> str), e.g. ByteTokenizer().decode or HFTokenizer.decode.
  stops: OpenAI `stop` strings ("" entries are ignored).
  prompt_ids: the request's prompt; its last few tokens are decoding context only, never emitted.
  skip_special_tokens: False decodes special tokens as their text (vLLM's field); decode must then
    take a `skip_special_tokens` keyword, as it must when a stop string may be a special token's text.
  include_stop_str_in_output: emit the stop string that ended the stream (vLLM's field).
  min_tokens: stop strings are not looked for until more tokens than this were pushed.
  """

  def __init__(
    self,
    decode: Callable[[list[int]], str],
    stops: Iterable[str] = (),
    prompt_ids: Iterable[int] | None = None,
    *,
    skip_special_tokens: bool = True,
    include_stop_str_in_output: bool = False,
    min_tokens: int = 0,
  ):
    self._raw_decode = decode
    self._skip = skip_special_tokens
    if not skip_special_tokens:
      decode = lambda ids: self._raw_decode(ids, skip_special_tokens=False)
    self._decode = decode
    # An empty stop string would match before any text; OpenAI clients never mean that.
    self._stops = tuple(s for s in stops if s)
    self._max_stop = max((len(s) for s in self._stops), default=0)
    self._include_stop = include_stop_str_in_output
    self._min_tokens = min_tokens

    context = [int(t) for t in prompt_ids][-PROMPT_CONTEXT:] if prompt_ids is not None else []
    context_text = decode(context) if context else ""
    if context_text.endswith(REPLACEMENT):
      # The prompt ends inside a character: its bytes would merge with the generated ones, and
      # the output would then not be the decoding of the generated ids. Decode without context.
      context, context_text = [], ""

    # Stage 1 state. ids[:read] have been passed on; the window is ids[prefix:] and the first
    # `done` characters of its decoding were passed on already.
    self._ids = context
    self._prefix = 0
    self._read = len(context)
    self._done = len(context_text)
    self._generated = 0  # generated ids pushed (context excluded)
    self._held_tried = 0  # _split_held: boundaries below this were tried and cut a character

    # Stage 2 state. Text out of stage 1 held back because it may be the start of a stop string.
    self._pending = ""
    self._chunks: list[str] = []  # every delta handed out, in order
    self._stopped = False
    self._stop_token_index: int | None = None
    self._finished = False

  @property
  def stopped(self) -> bool:
    """A stop string has appeared; later pushes are ignored."""
    return self._stopped

  @property
  def text(self) -> str:
    """Everything emitted so far. Never contains a stop string (unless include_stop_str_in_output),
    nor anything after one."""
    return "".join(self._chunks)

  def text_since(self, n: int) -> tuple[str, int]:
    """The text emitted after the first n deltas, and how many deltas there are now: a reader
    that keeps the count gets each new piece without re-joining the whole text."""
    return "".join(self._chunks[n:]), len(self._chunks)

  @property
  def stop_token_index(self) -> int | None:
    """How many generated tokens had been pushed when the stop string was seen (the engine keeps
    that many and drops the rest); None until stopped. It is the token that completed the stop,
    unless that token also left a character incomplete, in which case it is the one completing it."""
    return self._stop_token_index

  def push(self, token_ids: Iterable[int]) -> str:
    """Append newly generated ids; return the text that is now safe to emit (may be "")."""
    if self._finished:
      raise ValueError("push() after finish(): the request has ended")
    out = []
    # One id at a time, so a stop is found at the first token that produces it, even when the
    # engine commits several tokens of a row at once.
    for t in token_ids:
      if self._stopped:
        break
      self._generated += 1
      delta = self._detokenize(int(t))
      out.append(self._special_stop(int(t)) if delta is None else self._pass_on(delta))
    return "".join(out)

  def finish(self) -> str:
    """The request ended (length / eos / abort): return the text still held back. An incomplete
    character comes out as U+FFFD, as a full decode would show it; text held back as a possible
    stop prefix comes out as it is (the stop never completed). Later calls return ""."""
    if self._finished:
      return ""
    self._finished = True
    if self._stopped:
      return ""
    # Whatever the window holds is final now, U+FFFD or not. It may still complete a stop string.
    out = self._pass_on(self._decode(self._ids[self._prefix :])[self._done :])
    if not self._stopped and self._pending:
      out += self._pending
      self._chunks.append(self._pending)
      self._pending = ""
    return out

  # -- stage 1: token ids -> text ---------------------------------------------------------------

  def _detokenize(self, token: int) -> str | None:
    """Append `token`; return the new text that it makes final (may be ""), or None for a token
    with no text of its own."""
    ids = self._ids
    ids.append(token)
    text = self._decode(ids[self._prefix :])
    if text.endswith(REPLACEMENT):
      if not self._decode([token]):  # no text of its own: it cannot complete the character either
        ids.pop()
        return None
      # Maybe the first bytes of a character whose rest is still to come: wait for it.
      if len(ids) - self._read <= HOLD_TOKENS:
        return ""
      return self._split_held(text)
    if len(text) <= self._done:
      # Nothing new. A token without text of its own (a skipped special token) leaves the window:
      # the window keeps the context the next token needs and stays as short as it was.
      if not self._decode([token]):
        ids.pop()
        return None
      return ""
    delta = text[self._done :]
    # Slide: the tokens just passed on become the next window's context. Their decoding alone
    # can differ at its start from what was passed on (a stripped leading space, a character cut
    # at the window's start), which is why the offset is measured on the same window.
    self._prefix, self._read = self._read, len(ids)
    self._done = len(self._decode(ids[self._prefix : self._read]))
    return delta

  def _split_held(self, text: str) -> str:
    """A long run of held tokens whose text still ends in U+FFFD: pass on the part before the
    latest token boundary k where decoding splits cleanly, decode(ids[prefix:k]) +
    decode(ids[k:]) == decode(ids[prefix:]), with some text after k (so bytes after k were seen
    not to continue a character before it). For UTF-8 such a split stays clean whatever comes
    next, so the window restarts at k without context. None found: every boundary cuts a
    character (tokens straddling characters), keep holding."""
    ids = self._ids
    # A boundary that cut a character still cuts it whatever comes after, so each is tried once
    # (the one before the previous last token again: its rest may have decoded to nothing).
    for k in range(len(ids) - 1, max(self._read, self._held_tried - 2), -1):
      head = self._decode(ids[self._prefix : k])
      rest = self._decode(ids[k:])
      if rest and head + rest == text and len(head) >= self._done:
        delta = head[self._done :]
        self._prefix = self._read = k
        self._done = 0
        self._held_tried = 0
        return delta
    self._held_tried = len(ids)
    return ""

  # -- stage 2: stop strings --------------------------------------------------------------------

  def _pass_on(self, delta: str) -> str:
    """Feed text out of stage 1 through the stop-string check; return what may be emitted.
    A stop string cannot start in text already emitted (that text would have been a stop prefix
    and held back), so only the held text plus the new delta is searched: O(max stop + delta)."""
    if not self._stops:
      if delta:
        self._chunks.append(delta)
      return delta
    buf = self._pending + delta
    found = [(i, -len(s)) for i, s in ((buf.find(s), s) for s in self._stops) if i >= 0]
    if found and self._generated > self._min_tokens:
      # Earliest occurrence wins (the longest of those starting there); what follows it is dropped,
      # and the stop string too unless include_stop_str_in_output.
      i, minus_len = min(found)
      safe = buf[: i - minus_len if self._include_stop else i]
      self._pending = ""
      self._stopped = True
      self._stop_token_index = self._generated
    else:
      keep = self._stop_prefix_len(buf)
      safe, self._pending = buf[: len(buf) - keep], buf[len(buf) - keep :]
    if safe:
      self._chunks.append(safe)
    return safe

  def _special_stop(self, token: int) -> str:
    """A token that decodes to nothing may be a special token whose text is a stop string: the
    stream stops there, as it would if the text were shown (skip_special_tokens=False). Returns
    the text this emits ("" when it is no stop)."""
    if not self._stops or not self._skip or self._generated <= self._min_tokens:
      return ""
    try:
      text = self._raw_decode([token], skip_special_tokens=False)
    except TypeError:  # a decode without the keyword knows no special tokens
      return ""
    if text not in self._stops:
      return ""
    # The text before it is final: what the window still holds, then what stage 2 held back.
    held = self._decode(self._ids[self._prefix :])[self._done :]
    self._prefix = self._read = len(self._ids)
    self._done = 0
    out = self._pending + held + (text if self._include_stop else "")
    if out:
      self._chunks.append(out)
    self._pending = ""
    self._stopped = True
    self._stop_token_index = self._generated
    return out

  def _stop_prefix_len(self, buf: str) -> int:
    """Length of the longest tail of buf that is a proper prefix of some stop string."""
    for n in range(min(len(buf), self._max_stop - 1), 0, -1):
      tail = buf[-n:]
      if any(s.startswith(tail) for s in self._stops):
        return n
    return 0
