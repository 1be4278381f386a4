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

from jaxllm.serve.http import tools as tool_calls
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


def prompt_logprobs(score, text_of: TokenText) -> dict:
  """A prompt's part of an echoed choice's logprobs (a jaxllm.serve.score.PromptScore): the first
  token's logprob and top_logprobs are null (OpenAI, vLLM)."""
  lp = completion_logprobs(score.token_ids, score.logprobs, [a or [] for a in score.top], text_of, 0)
  if lp["top_logprobs"]:
    lp["top_logprobs"][0] = None
  return lp


def joined_logprobs(a: dict, b: dict) -> dict:
  """The logprobs of a's tokens followed by b's (b's text_offset already counts a's text)."""
  out = {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "text_offset")}
  tops = (a["top_logprobs"], b["top_logprobs"])
  out["top_logprobs"] = None if tops == (None, None) else (tops[0] or []) + (tops[1] or [])
  return out


def completion_usage(parsed, outputs: list[Output]) -> dict:
  """usage() over a batch: every prompt counts once, cached tokens are summed over the prompts."""
  k = parsed.per_prompt
  prompt = sum(len(p) for p in parsed.all_prompts)
  completion = sum(len(o.token_ids) for o in outputs)
  cached = sum(min(o.cached_tokens for o in outputs[j : j + k]) for j in range(0, len(outputs), k))
  return {
    "prompt_tokens": prompt,
    "completion_tokens": completion,
    "total_tokens": prompt + completion,
    "prompt_tokens_details": {"cached_tokens": cached},
  }


# ---- completions ------------------------------------------------------------------------------


class Completions:
  """Response objects of one /v1/completions request. A batch's choices are prompt-major (index =
  prompt * n + sample). With echo a choice's text starts with its prompt's (streamed: a first chunk
  of its own), and with logprobs too its logprobs start with the prompt's (`scores`: the prompts'
  jaxllm.serve.score.PromptScore, set before the response is built). With return_token_ids a
  scored choice also says `prompt_weight_version`, the weights that scored its prompt."""

  def __init__(self, parsed, model: str, text_of: TokenText):
    self.parsed, self.model, self.text_of = parsed, model, text_of
    self.id, self.created = new_id("cmpl"), int(time.time())
    self.scores: list | None = None  # PromptScore per prompt (echo with logprobs)

  def _head(self) -> dict:
    return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

  def _echo(self, i: int) -> str:
    return self.parsed.prompt_texts[i // self.parsed.per_prompt] if self.parsed.echo else ""

  def _extras(self, choice: dict, token_ids, version, first: bool, versions=None) -> dict:
    i = choice["index"]
    score = self.scores[i // self.parsed.per_prompt] if self.scores is not None else None
    if first and self.parsed.return_token_ids:
      choice["prompt_token_ids"] = self.parsed.choice_prompts[i]
      if score is not None:
        choice["prompt_weight_version"] = json_safe(score.weight_version)
    if version is None and score is not None:  # nothing generated yet: the scoring weights
      version = score.weight_version
    return token_extras(self.parsed, choice, token_ids, version, versions)

  def _logprobs(self, i: int, token_ids, logprobs, tops, offset: int, prompt: bool) -> dict | None:
    """Choice i's logprobs of these generated tokens, after its prompt's when `prompt` (echo)."""
    if not self.parsed.logprobs:
      return None
    lp = completion_logprobs(token_ids, logprobs, tops, self.text_of, offset)
    if prompt and self.scores is not None:
      lp = joined_logprobs(prompt_logprobs(self.scores[i // self.parsed.per_prompt], self.text_of), lp)
    return lp

  def response(self, outputs: list[Output]) -> dict:
    choices = []
    for i, o in enumerate(outputs):
      echo = self._echo(i)
      lp = self._logprobs(i, o.token_ids, o.logprobs, o.top_logprobs, len(echo), True)
      choice = {"index": i, "text": echo + o.text, "logprobs": lp, "finish_reason": o.finish_reason}
      choices.append(self._extras(choice, o.token_ids, o.weight_version, True, o.weight_versions))
    return self._head() | {"choices": choices, "usage": completion_usage(self.parsed, outputs)}

  async def stream(self, events):
    outputs = [Output() for _ in range(self.parsed.n)]
    if self.parsed.echo:  # each choice opens with its prompt
      for i in range(self.parsed.n):
        lp = self._logprobs(i, [], [], [], 0, True)
        choice = {"index": i, "text": self._echo(i), "logprobs": lp, "finish_reason": None}
        yield sse(self._head() | {"choices": [self._extras(choice, [], None, True)]})
    async for i, ev in events:
      o = outputs[i]
      first = not self.parsed.echo and not o.token_ids and not o.chars
      offset = len(self._echo(i)) + o.chars
      o.add(ev)
      if ev.finish_reason == "error":
        yield sse(error_chunk(ev))
        continue
      if not (ev.text or ev.finish_reason or (ev.token_ids and (self.parsed.logprobs or self.parsed.return_token_ids))):
        continue
      lp = self._logprobs(i, ev.token_ids, ev.logprobs, ev.top_logprobs, offset, False)
      choice = {"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
      yield sse(self._head() | {"choices": [self._extras(choice, ev.token_ids, ev.weight_version, first)]})
    if self.parsed.include_usage:
      yield sse(self._head() | {"choices": [], "usage": completion_usage(self.parsed, outputs)})
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
      message, finish = {"role": "assistant", "content": o.text}, o.finish_reason
      parser = self.parsed.tools.parser() if self.parsed.tools else None
      if parser is not None:
        message["content"], calls = tool_calls.parse(o.text, parser)
        if calls:
          message["tool_calls"] = [c.message() for c in calls]
        finish = tool_calls.finish_reason(finish, len(calls))
      choice = {"index": i, "message": message, "logprobs": lp, "finish_reason": finish}
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
    parsers = [self.parsed.tools.parser() if self.parsed.tools else None for _ in outputs]
    calls = [0] * self.parsed.n  # tool calls streamed per choice
    async for i, ev in events:
      outputs[i].add(ev)
      if ev.finish_reason == "error":
        yield sse(error_chunk(ev))
        continue
      deltas, finish = self._deltas(parsers[i], ev, calls, i)
      if not (deltas or finish or (ev.token_ids and (self.parsed.logprobs or self.parsed.return_token_ids))):
        continue
      lp = None
      if self.parsed.logprobs:
        lp = chat_logprobs(ev.token_ids, ev.logprobs, ev.top_logprobs, self.text_of)
      deltas = deltas or [{} if finish else {"content": ""}]
      for k, delta in enumerate(deltas):  # the event's logprobs and ids with the first, the finish with the last
        last = k == len(deltas) - 1
        choice = {
          "index": i,
          "delta": delta,
          "logprobs": lp if k == 0 else None,
          "finish_reason": finish if last else None,
        }
        if k == 0:
          choice = self._extras(choice, ev.token_ids, ev.weight_version)
        yield sse(head() | {"choices": [choice]})
    if self.parsed.include_usage:
      yield sse(head() | {"choices": [], "usage": usage(outputs)})
    yield SSE_DONE

  @staticmethod
  def _deltas(parser, ev: Event, calls: list, i: int) -> tuple[list, str | None]:
    """(deltas, finish_reason) of one event of choice i: its text as content, or through the tool
    parser as content and tool-call deltas (calls[i] counts the choice's calls)."""
    if parser is None:
      return ([{"content": ev.text}] if ev.text else []), ev.finish_reason
    deltas = []
    for item in parser.feed(ev.text) + (parser.finish() if ev.finish_reason else []):
      if isinstance(item, str):
        deltas.append({"content": item})
      else:
        deltas += item.deltas(calls[i])
        calls[i] += 1
    return deltas, tool_calls.finish_reason(ev.finish_reason, calls[i])


def error_chunk(ev: Event) -> dict:
  return error_body(500, f"generation failed: {ev.error or 'engine error'}", None, "engine_error")
