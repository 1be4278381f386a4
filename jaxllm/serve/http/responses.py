"""Engine events -> OpenAI response objects and server-sent-event chunks (completions and chat).

Non-streamed: the events of every choice are accumulated (`Output`) and one object is returned.
Streamed: each event becomes a `data: {json}\n\n` chunk as it arrives (choices interleave, each
chunk names its index), then a usage chunk when stream_options.include_usage, then `data: [DONE]`.
An event whose text is held back (a partial character, a possible stop-string prefix) still gets a
chunk when it carries something else the client asked for (logprobs, token ids), so every token's
logprob is streamed exactly once; otherwise it is skipped.

Usage: the prompt counts once whatever n is (OpenAI); completion tokens are summed over choices;
`prompt_tokens_details.cached_tokens` (always present) is the prompt tokens every choice found in
the prefix cache (their minimum: with n > 1 the first choice computes what the others reuse).

Extensions for RL clients (vLLM's names), only when `return_token_ids`: `prompt_token_ids`,
`token_ids` and `weight_version` (the weights that produced the tokens) on each choice -- in
streaming, token_ids are the chunk's new tokens and prompt_token_ids come in a choice's first chunk.
Non-streamed, `weight_versions` adds each token's weights (parallel to token_ids), since the tokens of
one choice can span a weight swap and `weight_version` names only the latest.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from jaxllm.serve.http.errors import error_body
from jaxllm.serve.service import Event


@dataclass
class Output:
  """What one choice (one engine request) has produced so far."""

  pieces: list = field(default_factory=list)  # the text, one piece per event (joined once, by `text`)
  chars: int = 0  # characters of text so far
  token_ids: list = field(default_factory=list)
  logprobs: list = field(default_factory=list)
  top_logprobs: list = field(default_factory=list)
  finish_reason: str | None = None
  prompt_tokens: int = 0
  cached_tokens: int = 0
  weight_version: object = None  # the weights of the latest tokens
  weight_versions: list = field(default_factory=list)  # per token, the weights that produced it
  error: str = ""

  @property
  def text(self) -> str:
    return "".join(self.pieces)

  def add(self, ev: Event) -> None:
    if ev.text:
      self.pieces.append(ev.text)
      self.chars += len(ev.text)
    self.token_ids += ev.token_ids
    self.weight_versions += [ev.weight_version] * len(ev.token_ids)
    self.logprobs += ev.logprobs
    self.top_logprobs += ev.top_logprobs
    self.finish_reason = ev.finish_reason
    self.prompt_tokens, self.cached_tokens = ev.prompt_tokens, ev.cached_tokens
    self.weight_version, self.error = ev.weight_version, ev.error


def usage(outputs: list[Output]) -> dict:
  prompt = outputs[0].prompt_tokens
  completion = sum(len(o.token_ids) for o in outputs)
  return {
    "prompt_tokens": prompt,
    "completion_tokens": completion,
    "total_tokens": prompt + completion,
    "prompt_tokens_details": {"cached_tokens": min(o.cached_tokens for o in outputs)},
  }


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def json_safe(v):
  """A weight version as JSON: plain values as they are, anything else as its str()."""
  return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def token_extras(parsed, choice: dict, token_ids, version, versions=None) -> dict:
  """vLLM's return_token_ids extension: the choice's token ids and the weights that produced them.
  versions (a whole response's): per token, its weights -- tokens can span a weight swap; then
  `weight_version` is the latest and `weight_versions` names each token's (parallel to token_ids)."""
  if parsed.return_token_ids:
    choice["token_ids"] = list(token_ids)
    choice["weight_version"] = json_safe(version)
    if versions is not None:
      choice["weight_versions"] = [json_safe(v) for v in versions]
  return choice


def first_error(outputs: list[Output]) -> str | None:
  return next((o.error or "engine error" for o in outputs if o.finish_reason == "error"), None)


# ---- logprobs ---------------------------------------------------------------------------------


class TokenText:
  """Token id -> its text on its own (a byte-level token inside a multi-byte character shows as
  U+FFFD: the tokenizer interface has no raw token bytes)."""

  def __init__(self, tokenizer):
    self.decode = tokenizer.decode
    self.cache: dict[int, str] = {}

  def __call__(self, token_id: int) -> str:
    s = self.cache.get(token_id)
    if s is None:
      s = self.cache[token_id] = self.decode([token_id])
    return s


def completion_logprobs(token_ids, logprobs, tops, text_of: TokenText, offset: int) -> dict:
  """OpenAI's legacy completions logprobs object for these tokens; text_offset counts from `offset`
  (the completion's characters before them), as the concatenation of the tokens' texts."""
  tokens = [text_of(t) for t in token_ids]
  offsets = []
  for s in tokens:
    offsets.append(offset)
    offset += len(s)
  top = None
  if tops:
    # Keyed by text: ids sharing a text (U+FFFD, specials) keep the likeliest one's logprob.
    top = []
    for alts in tops:
      d = {}
      for i, lp in alts:
        d.setdefault(text_of(i), lp)
      top.append(d)
  return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_ids, logprobs, tops, text_of: TokenText) -> dict:
  entry = lambda t, lp: {"token": text_of(t), "logprob": lp, "bytes": list(text_of(t).encode())}
  content = []
  for k, (t, lp) in enumerate(zip(token_ids, logprobs)):
    content.append(entry(t, lp) | {"top_logprobs": [entry(i, alp) for i, alp in tops[k]] if tops else []})
  return {"content": content}


# ---- completions ------------------------------------------------------------------------------


class Completions:
  """Response objects of one /v1/completions request."""

  def __init__(self, parsed, model: str, text_of: TokenText):
    self.parsed, self.model, self.text_of = parsed, model, text_of
    self.id, self.created = new_id("cmpl"), int(time.time())

  def _head(self) -> dict:
    return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

  def _extras(self, choice: dict, token_ids, version, first: bool, versions=None) -> dict:
    if first and self.parsed.return_token_ids:
      choice["prompt_token_ids"] = self.parsed.prompt_ids
    return token_extras(self.parsed, choice, token_ids, version, versions)

  def response(self, outputs: list[Output]) -> dict:
    choices = []
    for i, o in enumerate(outputs):
      lp = (
        completion_logprobs(o.token_ids, o.logprobs, o.top_logprobs, self.text_of, 0) if self.parsed.logprobs else None
      )
      choice = {"index": i, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason}
      choices.append(self._extras(choice, o.token_ids, o.weight_version, True, o.weight_versions))
    return self._head() | {"choices": choices, "usage": usage(outputs)}

  async def stream(self, events):
    outputs = [Output() for _ in range(self.parsed.n)]
    async for i, ev in events:
      o = outputs[i]
      first, offset = not o.token_ids and not o.chars, o.chars
      o.add(ev)
      if ev.finish_reason == "error":
        yield sse(error_chunk(ev))
        continue
      if not (ev.text or ev.finish_reason or (ev.token_ids and (self.parsed.logprobs or self.parsed.return_token_ids))):
        continue
      lp = None
      if self.parsed.logprobs:
        lp = completion_logprobs(ev.token_ids, ev.logprobs, ev.top_logprobs, self.text_of, offset)
      choice = {"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
      yield sse(self._head() | {"choices": [self._extras(choice, ev.token_ids, ev.weight_version, first)]})
    if self.parsed.include_usage:
      yield sse(self._head() | {"choices": [], "usage": usage(outputs)})
    yield SSE_DONE


# ---- chat -------------------------------------------------------------------------------------


class ChatCompletions:
  """Response objects of one /v1/chat/completions request."""

  def __init__(self, parsed, model: str, text_of: TokenText):
    self.parsed, self.model, self.text_of = parsed, model, text_of
    self.id, self.created = new_id("chatcmpl"), int(time.time())

  def _head(self, obj: str) -> dict:
    return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

  def _extras(self, choice: dict, token_ids, version, versions=None) -> dict:
    return token_extras(self.parsed, choice, token_ids, version, versions)

  def response(self, outputs: list[Output]) -> dict:
    choices = []
    for i, o in enumerate(outputs):
      lp = chat_logprobs(o.token_ids, o.logprobs, o.top_logprobs, self.text_of) if self.parsed.logprobs else None
      choice = {
        "index": i,
        "message": {"role": "assistant", "content": o.text},
        "logprobs": lp,
        "finish_reason": o.finish_reason,
      }
      choices.append(self._extras(choice, o.token_ids, o.weight_version, o.weight_versions))
    out = self._head("chat.completion") | {"choices": choices, "usage": usage(outputs)}
    if self.parsed.return_token_ids:
      out["prompt_token_ids"] = self.parsed.prompt_ids
    return out

  async def stream(self, events):
    head = lambda: self._head("chat.completion.chunk")
    # Every choice opens with its role (OpenAI's first delta), before any token arrives.
    for i in range(self.parsed.n):
      choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
      first = head() | {"choices": [choice]}
      if i == 0 and self.parsed.return_token_ids:
        first["prompt_token_ids"] = self.parsed.prompt_ids
      yield sse(first)
    outputs = [Output() for _ in range(self.parsed.n)]
    async for i, ev in events:
      outputs[i].add(ev)
      if ev.finish_reason == "error":
        yield sse(error_chunk(ev))
        continue
      if not (ev.text or ev.finish_reason or (ev.token_ids and (self.parsed.logprobs or self.parsed.return_token_ids))):
        continue
      lp = None
      if self.parsed.logprobs:
        lp = chat_logprobs(ev.token_ids, ev.logprobs, ev.top_logprobs, self.text_of)
      delta = {"content": ev.text} if ev.text or not ev.finish_reason else {}
      choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
      yield sse(head() | {"choices": [self._extras(choice, ev.token_ids, ev.weight_version)]})
    if self.parsed.include_usage:
      yield sse(head() | {"choices": [], "usage": usage(outputs)})
    yield SSE_DONE


def error_chunk(ev: Event) -> dict:
  return error_body(500, f"generation failed: {ev.error or 'engine error'}", None, "engine_error")
