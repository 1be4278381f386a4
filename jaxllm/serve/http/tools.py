"""Tools (function calling) on /v1/chat/completions: the model's call format, model text -> OpenAI
`tool_calls` (whole or streamed), and the grammar that makes `required` and named choices hold.

A request's `tools` reach the chat template as `tools` (Hugging Face apply_chat_template semantics);
history messages keep their `tool_calls` and `tool_call_id` (chat_request.chat_history). The model then
answers in its own call format, two of which are read (vLLM's tool parsers of the same names):

  hermes       Qwen2.5, Qwen3, Hermes and the plain default template: each call is a block
               <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>; text before, between and
               after the blocks is content.
  llama3_json  Llama 3.1 / 3.2 (JSON tool calling): the reply opens with {"name": "f", "parameters":
               {...}} ("arguments" accepted too), optionally after <|python_tag|>, further calls after
               a ";"; text after the last call is content. A reply that opens with anything else is
               content (vLLM's llama3_json reads calls at the start of the reply too).

The format follows the chat template (`template_format`: a template that writes <tool_call> is hermes,
a Llama-3 header template llama3_json, anything else hermes), unless serve.tool_parser names one.

A call counts when its JSON parses, names one of the request's tools and carries an object of
arguments (a JSON object, or a string holding one); anything else (a broken or unknown call, a call
cut off by max_tokens) stays in content as the model wrote it. Its `arguments` are the object as
json.dumps writes it (vLLM's form). With parallel_tool_calls false only the first call counts.
Whitespace between content and a call is dropped; with calls and no other text, content is null.

tool_choice (OpenAI's; the default is "auto" with tools, "none" without, and "auto" without tools is "none"):
  none      the tools are rendered (as vLLM does by default); the output is plain content
  auto      the output is parsed as above
  required  a grammar (llguidance Lark, the JSON schema of each allowed call inside the format's
            markers) makes the reply one or more calls (exactly one when parallel_tool_calls is
            false) to the request's tools, with arguments valid for their `parameters`
  named     the same with one call of that function

Streaming (`ToolParser.feed`): content streams as it comes, holding back only text that may open a
call marker; a call is sent once its block is complete, so an invalid one can still fall back to
content: a first delta {index, id, type, function: {name, arguments: ""}} and then its arguments
(OpenAI's chunk shape). vLLM instead streams argument fragments as they are generated, at the price
of calls it cannot take back.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from jaxllm.config import TOOL_PARSERS

FORMATS = TOOL_PARSERS[1:]  # serve.tool_parser: "auto" or one of these
CHOICES = ("none", "auto", "required")  # plus a named function
REQUEST_FIELDS = {"tools", "tool_choice", "parallel_tool_calls"}  # of a chat request
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's code/tool marker (a special token: seen only unskipped)
_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def template_format(source: str | None, tool_parser: str = "auto") -> str:
  """The call format of a chat template (source None: the default template), or the one named."""
  if tool_parser != "auto":
    return tool_parser
  if source and HERMES_OPEN not in source and ("<|start_header_id|>" in source or PYTHON_TAG in source):
    return "llama3_json"
  return "hermes"


@dataclass(frozen=True)
class ToolRequest:
  """The tool fields of one chat request, validated (chat_request.chat_tools)."""

  tools: tuple  # the request's tool objects as sent: what the chat template gets as `tools`
  choice: str  # "none", "auto", "required" or "function" (a named function)
  function: str | None = None  # the named function's name (choice "function")
  parallel: bool = True  # parallel_tool_calls
  format: str = "hermes"  # the model's call format (FORMATS)

  @property
  def names(self) -> tuple:
    return tuple(t["function"]["name"] for t in self.tools)

  def parser(self) -> ToolParser | None:
    """A parser of one choice's output; None when the output is not read for calls."""
    return ToolParser(self.format, self.names, self.parallel) if self.choice != "none" else None

  def allowed(self) -> list[dict]:
    """The function objects a constrained reply may call."""
    fns = [t["function"] for t in self.tools]
    return [f for f in fns if f["name"] == self.function] if self.choice == "function" else fns


@dataclass(frozen=True)
class ToolCall:
  name: str
  arguments: str  # JSON text of the arguments object

  def message(self) -> dict:
    """OpenAI's tool call object of a response message."""
    return {"id": new_call_id(), "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

  def deltas(self, index: int) -> list[dict]:
    """The streamed deltas of the call numbered `index` in its choice: the header, then the arguments."""
    head = {"index": index, "id": new_call_id(), "type": "function", "function": {"name": self.name, "arguments": ""}}
    return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": self.arguments}}]}]


def new_call_id() -> str:
  return f"call_{uuid.uuid4().hex[:24]}"


# ---- the grammar of required / named choices -----------------------------------------------------


def call_schema(fmt: str, fn: dict) -> dict:
  """JSON schema of one call object of `fn` in format `fmt`."""
  key = "parameters" if fmt == "llama3_json" else "arguments"
  return {
    "type": "object",
    "properties": {"name": {"const": fn["name"]}, key: fn.get("parameters") or _EMPTY_PARAMETERS},
    "required": ["name", key],
    "additionalProperties": False,
  }


def grammar(req: ToolRequest, is_token=lambda text: False) -> tuple | None:
  """("lark", grammar) making the reply valid calls for a required / named choice; None otherwise.
  is_token(text): whether the tokenizer has `text` as one added token (Qwen's <tool_call>), which
  llguidance's Lark names as <text>; other markers are literal text."""
  if req.choice not in ("required", "function"):
    return None
  fmt = req.format
  schemas = [call_schema(fmt, fn) for fn in req.allowed()]
  schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
  # Compact JSON, as jaxllm.serve.grammar generates it: no run of whitespace can fill max_tokens.
  body = "%json " + json.dumps(schema | {"x-guidance": {"whitespace_flexible": False}})
  many = req.parallel and req.choice == "required"
  if fmt == "llama3_json":
    start, call = 'call ("; " call)*' if many else "call", body
  else:
    mark = lambda text: text if is_token(text) else json.dumps(text)
    start = 'call ("\\n" call)*' if many else "call"
    call = f'{mark(HERMES_OPEN)} "\\n" {body} "\\n" {mark(HERMES_CLOSE)}'
  return ("lark", f"start: {start}\ncall: {call}\n")


# ---- model text -> content and calls ---------------------------------------------------------------


def _call(text: str, names: tuple, keys: tuple) -> ToolCall | None:
  """The call written as JSON `text`, or None when it is not one (see the module doc)."""
  try:
    obj = json.loads(text)
  except ValueError:
    return None
  if not isinstance(obj, dict) or obj.get("name") not in names:
    return None
  args = next((obj[k] for k in keys if k in obj), {})
  if isinstance(args, str):
    try:
      args = json.loads(args)
    except ValueError:
      return None
  if not isinstance(args, dict):
    return None
  return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _marker_prefix(text: str, marker: str) -> int:
  """Length of the longest end of `text` that is a proper prefix of `marker` (held back: it may open one)."""
  for n in range(min(len(text), len(marker) - 1), 0, -1):
    if marker.startswith(text[-n:]):
      return n
  return 0


class _ObjectEnd:
  """Finds where a JSON object that opens a text ends, incrementally (strings and escapes tracked)."""

  def __init__(self):
    self.pos, self.depth, self.in_string, self.escaped = 0, 0, False, False

  def scan(self, text: str) -> int | None:
    """Index past the object's closing brace, or None while it is still open."""
    for i in range(self.pos, len(text)):
      c = text[i]
      if self.in_string:
        if self.escaped:
          self.escaped = False
        elif c == "\\":
          self.escaped = True
        elif c == '"':
          self.in_string = False
      elif c == '"':
        self.in_string = True
      elif c in "{[":
        self.depth += 1
      elif c in "}]":
        self.depth -= 1
        if self.depth == 0:
          return i + 1
    self.pos = len(text)
    return None


class ToolParser:
  """Model text of one choice, fed as it is generated -> content strings and ToolCalls, in order.
  feed(text) returns what is settled so far, finish() the rest; feeding everything at once and
  finishing is the non-streamed parse, so both ways give the same result."""

  def __init__(self, fmt: str, names: tuple, parallel: bool = True):
    self.fmt, self.names, self.parallel = fmt, tuple(names), parallel
    self.buf = ""  # text not settled yet
    self.state = "start"  # hermes: "text" / "call"; llama3_json: "start" / "call" / "between" / "text"
    self.calls = 0
    self.pending = ""  # trailing whitespace of content, sent once more content follows
    self.after_call = False  # drop the whitespace that follows a call
    self.scanner = _ObjectEnd()
    self.out: list = []

  def feed(self, text: str) -> list:
    self.buf += text
    (self._hermes if self.fmt == "hermes" else self._llama)(final=False)
    return self._take()

  def finish(self) -> list:
    (self._hermes if self.fmt == "hermes" else self._llama)(final=True)
    if self.pending and not self.after_call:
      self.out.append(self.pending)
    self.pending = ""
    return self._take()

  def _take(self) -> list:
    out, self.out = self.out, []
    return out

  def _content(self, text: str) -> None:
    if self.after_call:
      text = text.lstrip()
      if not text:
        return
      self.after_call = False
    body = text.rstrip()
    if body:
      self.out.append(self.pending + body)
      self.pending = ""
    self.pending += text[len(body) :]

  def _emit(self, text: str, keys: tuple) -> bool:
    """A call, when `text` is one and one more is allowed (then True); else nothing."""
    call = _call(text, self.names, keys) if self.parallel or self.calls == 0 else None
    if call is None:
      return False
    self.out.append(call)
    self.calls += 1
    self.pending, self.after_call = "", True
    return True

  def _hermes(self, final: bool) -> None:
    while True:
      if self.state != "call":
        k = self.buf.find(HERMES_OPEN)
        if k < 0:
          keep = 0 if final else _marker_prefix(self.buf, HERMES_OPEN)
          self._content(self.buf[: len(self.buf) - keep])
          self.buf = self.buf[len(self.buf) - keep :]
          return
        self._content(self.buf[:k])
        self.buf, self.state = self.buf[k + len(HERMES_OPEN) :], "call"
        continue
      k = self.buf.find(HERMES_CLOSE)
      if k < 0 and not final:
        return
      body = self.buf if k < 0 else self.buf[:k]  # an unclosed call at the end still counts when it parses
      block = HERMES_OPEN + (self.buf if k < 0 else self.buf[: k + len(HERMES_CLOSE)])
      self.buf, self.state = ("" if k < 0 else self.buf[k + len(HERMES_CLOSE) :]), "text"
      if not self._emit(body, ("arguments",)):
        self._content(block)

  def _llama(self, final: bool) -> None:
    while True:
      if self.state in ("start", "between"):
        rest = self.buf.lstrip()
        if self.state == "between" and rest.startswith(";"):
          rest, self.state = rest[1:], "start"
          self.buf = rest
          continue
        if self.state == "start" and rest.startswith(PYTHON_TAG):
          self.buf = rest[len(PYTHON_TAG) :]
          continue
        if rest.startswith("{"):
          self.buf, self.state, self.scanner = rest, "call", _ObjectEnd()
          continue
        undecided = not rest or (self.state == "start" and PYTHON_TAG.startswith(rest))
        if undecided and not final:
          return
        self.state = "text"
        if self.calls and self.buf.strip() == ";":  # a dangling separator
          self.buf = ""
      if self.state == "call":
        end = self.scanner.scan(self.buf)
        if end is None and not final:
          return
        if end is not None and self._emit(self.buf[:end], ("parameters", "arguments")):
          self.buf, self.state = self.buf[end:], "between"
          continue
        self.state = "text"
      self._content(self.buf)
      self.buf = ""
      return


def parse(text: str, parser: ToolParser) -> tuple[str | None, list]:
  """Non-streamed: (content, [ToolCall]) of a whole reply; content is None when it is empty and there
  are calls (OpenAI's message shape)."""
  items = parser.feed(text) + parser.finish()
  calls = [x for x in items if isinstance(x, ToolCall)]
  content = "".join(x for x in items if isinstance(x, str))
  return (content or None) if calls else content, calls


def finish_reason(reason: str | None, calls: int) -> str | None:
  """OpenAI's "tool_calls" for a reply that stopped after making calls; "length" and others stay."""
  return "tool_calls" if calls and reason == "stop" else reason
