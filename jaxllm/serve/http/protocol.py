"""Request bodies -> validated generation requests, for the three APIs the server speaks:
OpenAI completions, OpenAI chat completions and SGLang's native /generate.

Every field a client sends is read here with its type and range, and every problem is an APIError
(400, or 404 for an unknown model) whose message names the field and what it must be. Every number
is bounded here, so nothing a client sends can overflow the sampler's int32/float32 arrays. A field
this server does not implement is rejected by name ("unsupported field 'suffix'"), never silently
ignored: a client relying on it would otherwise get a different behaviour than it asked for. Two
leniencies, as vLLM's accept-and-warn: JSON null counts as absent for any field (OpenAI clients send
it for "not given"), and a field in NOOP_VALUES is accepted with the value that changes nothing
(`best_of: 1`, `tools: []`, `response_format: {"type": "text"}`, ...), the value clients send by
default. Which fields are supported is decided in one place: the *_FIELDS sets (implemented) and
NOOP_VALUES (accepted only as no-ops); a field moves from the second to the first when it is built.

The result, `Parsed`, holds token ids and one SamplingParams per choice (n > 1 = n engine requests;
with a seed s they get seeds s, s+1, ...; without one, each gets a random seed so they differ).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

from jaxllm.serve import grammar
from jaxllm.serve.http import tools as tool_calls
from jaxllm.serve.http.errors import APIError, bad_request
from jaxllm.serve.sampling import (
  FLOAT32_MAX,
  INT32_MAX,
  MAX_STOP_TOKEN_IDS,
  SEED_MAX,
  SEED_MIN,
  TOP_LOGPROBS,
  SamplingParams,
  with_random_seed,
)

MAX_STOP = 4  # OpenAI: up to 4 stop sequences
MAX_COMPLETION_LOGPROBS = 5  # OpenAI completions: logprobs in 0..5
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI completions default
GENERATE_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang default
MAX_JSON_DEPTH = 64  # nesting of a request body (a JSON schema included) at most

# Fields of both OpenAI endpoints; vLLM's extensions (top_k, min_p, repetition_penalty, min_tokens,
# ignore_eos, return_token_ids) included.
_OPENAI_COMMON = {
  "model",
  "max_tokens",
  "temperature",
  "top_p",
  "n",
  "stream",
  "stream_options",
  "stop",
  "seed",
  "logit_bias",
  "presence_penalty",
  "frequency_penalty",
  "user",
  "top_k",
  "min_p",
  "repetition_penalty",
  "min_tokens",
  "ignore_eos",
  "return_token_ids",
  "logprobs",
}
# vLLM's fields for real chat models (stops, special tokens, BOS): see "Chat models" in docs/serving.md.
_OPENAI_COMMON |= {"stop_token_ids", "skip_special_tokens", "include_stop_str_in_output", "add_special_tokens"}
COMPLETION_FIELDS = _OPENAI_COMMON | {"prompt", "echo"}
CHAT_FIELDS = _OPENAI_COMMON | {"messages", "max_completion_tokens", "top_logprobs"} | tool_calls.REQUEST_FIELDS
CHAT_FIELDS |= {"chat_template_kwargs", "continue_final_message", "add_generation_prompt"}
# Template variables the server sets itself: chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "bos_token", "eos_token")
GENERATE_FIELDS = {
  "text",
  "input_ids",
  "sampling_params",
  "stream",
  "return_logprob",
  "return_prompt_logprob",
  "top_logprobs_num",
  "logprob_start_len",
}
GENERATE_SAMPLING_FIELDS = {
  "max_new_tokens",
  "min_new_tokens",
  "temperature",
  "top_p",
  "top_k",
  "min_p",
  "stop",
  "stop_token_ids",
  "ignore_eos",
  "presence_penalty",
  "frequency_penalty",
  "repetition_penalty",
  "logit_bias",
  "n",
  "sampling_seed",
  "skip_special_tokens",  # SGLang's, as vLLM's
  "no_stop_trim",  # SGLang's name of include_stop_str_in_output
}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Structured output (jaxllm.serve.grammar): OpenAI's response_format, vLLM's guided_* fields and their
# newer form structured_outputs, SGLang's json_schema / regex / ebnf sampling params.
STRUCTURED_OPENAI_FIELDS = {
  "response_format",
  "guided_json",
  "guided_regex",
  "guided_grammar",
  "guided_choice",
  "structured_outputs",
}
STRUCTURED_GENERATE_FIELDS = {"json_schema", "regex", "ebnf"}
COMPLETION_FIELDS |= STRUCTURED_OPENAI_FIELDS
CHAT_FIELDS |= STRUCTURED_OPENAI_FIELDS
GENERATE_SAMPLING_FIELDS |= STRUCTURED_GENERATE_FIELDS
# A chat message's fields; assistant history may carry tool calls, tool results name their call
# (passed to the chat template as they are).
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id"}


def _is_n(v, body) -> bool:
  return v == (body.get("n") if body.get("n") is not None else 1)


def _no_tools(v, body) -> bool:
  return v in ("none", "auto") and not body.get("tools")


# Fields accepted only with a value that asks for nothing (vLLM accepts them; clients send these
# defaults): name -> (is the value a no-op, given the body; what is accepted, for the 400).
NOOP_VALUES = {
  "echo": (lambda v, body: v is False, "false"),
  "best_of": (_is_n, "equal to n"),
  "suffix": (lambda v, body: v == "", '""'),
  "tools": (lambda v, body: v == [], "[]"),
  "tool_choice": (_no_tools, '"none" or "auto" while no tools are given'),
  "parallel_tool_calls": (lambda v, body: isinstance(v, bool) and not body.get("tools"), "a boolean, without tools"),
  "response_format": (lambda v, body: v == {"type": "text"}, '{"type": "text"}'),
  "store": (lambda v, body: v is False, "false"),
  "modalities": (lambda v, body: v == ["text"], '["text"]'),
}


@dataclass(frozen=True)
class ModelInfo:
  """What validation needs to know about the served model."""

  name: str  # the model id of the API
  vocab_size: int  # token ids 0..vocab_size-1
  context: int  # prompt + completion tokens at most (max_seq_len, capped by the KV pool)
  eos_ids: tuple  # the model's end-of-sequence ids (jaxllm.io.eos_ids): stop tokens unless ignore_eos
  max_n: int  # serve.max_n
  # Values for fields a request omits (LoadedModel.request_defaults): generation_config.json's sampling
  # defaults (vLLM's --generation-config auto), add_special_tokens for /v1/completions.
  defaults: dict = field(default_factory=dict)


@dataclass
class Parsed:
  """A validated request, whichever API it came through."""

  prompt_ids: list
  sampling: list  # SamplingParams per choice
  stream: bool = False
  include_usage: bool = False  # stream_options.include_usage
  logprobs: bool = False  # the sampled tokens' logprobs
  top_logprobs: int = 0  # and this many alternatives per token
  return_token_ids: bool = False  # vLLM's extension: prompt_token_ids / token_ids in the response
  tools: object = None  # chat: a tools.ToolRequest when the request has tools
  prompts: list | None = None  # a batch (/v1/completions): every prompt's ids, choices prompt-major
  prompt_texts: list | None = None  # each prompt's text, for echo
  echo: bool = False  # /v1/completions: the prompt (and its logprobs) before the completion
  prompt_logprobs: int = -1  # the prompt's log-probs with this many alternatives per position; -1: none
  generate: bool = True  # False: max_tokens 0, the prompt is only echoed / scored
  logprob_start: int = 0  # /generate: the first prompt position whose log-prob is reported

  @property
  def n(self) -> int:
    return len(self.sampling)

  @property
  def all_prompts(self) -> list:
    return self.prompts if self.prompts is not None else [self.prompt_ids]

  @property
  def per_prompt(self) -> int:
    """Choices of each prompt (the request's n)."""
    return self.n // len(self.all_prompts)

  @property
  def choice_prompts(self) -> list:
    """The prompt of each choice: choice i is the (i % n)-th of prompt i // n (OpenAI's order)."""
    return [self.all_prompts[i // self.per_prompt] for i in range(self.n)]


# ---- reading typed fields ---------------------------------------------------------------------


def check_json(v, where: str = "", depth: int = 0) -> None:
  """A parsed body holds only text the tokenizer can take (Python's json accepts a lone UTF-16
  surrogate such as "\\ud800", which no UTF-8 text holds) and nests at most MAX_JSON_DEPTH deep."""
  if depth > MAX_JSON_DEPTH:
    raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
  if isinstance(v, str):
    try:
      v.encode("utf-8")
    except UnicodeEncodeError:
      raise bad_request(
        f"'{where or 'the request body'}' holds a lone UTF-16 surrogate, which is not text",
        where or None,
        "invalid_json",
      ) from None
  elif isinstance(v, dict):
    for key, value in v.items():
      name = f"{where}.{key}" if where else str(key)
      check_json(key, where, depth + 1)
      check_json(value, name, depth + 1)
  elif isinstance(v, list):
    for i, value in enumerate(v):
      check_json(value, f"{where}[{i}]", depth + 1)


def json_type(v) -> str:
  if isinstance(v, bool):
    return "boolean"
  return {int: "integer", float: "number", str: "string", list: "array", dict: "object", type(None): "null"}.get(
    type(v), type(v).__name__
  )


_KINDS = {
  "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
  "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
  "boolean": lambda v: isinstance(v, bool),
  "string": lambda v: isinstance(v, str),
  "array": lambda v: isinstance(v, list),
  "object": lambda v: isinstance(v, dict),
}


class Fields:
  """The fields of one JSON object, read one at a time with their type; unknown ones are rejected
  up front unless null or a no-op of `noop` (NOOP_VALUES). `where` prefixes names in messages
  ("sampling_params.top_k")."""

  def __init__(self, obj, allowed: set, where: str = "", noop: dict | None = None):
    if not isinstance(obj, dict):
      raise bad_request(f"{where or 'the request body'} must be a JSON object, got {json_type(obj)}", where or None)
    self.obj, self.where = obj, where
    for key, value in obj.items():
      if key in allowed or value is None:
        continue
      if noop and key in noop:
        is_noop, accepted = noop[key]
        if is_noop(value, obj):
          continue
        raise bad_request(
          f"unsupported value for '{self.name(key)}': {_short(value)}; this server accepts it only as {accepted}",
          self.name(key),
          "unsupported_value",
        )
      raise bad_request(
        f"unsupported field '{self.name(key)}': this server does not implement it "
        f"(supported: {', '.join(sorted(allowed))})",
        self.name(key),
        "unsupported_field",
      )

  def name(self, key: str) -> str:
    return f"{self.where}.{key}" if self.where else key

  def given(self, key: str) -> bool:
    return self.obj.get(key) is not None

  def get(self, key: str, kind: str, default=None):
    v = self.obj.get(key)
    if v is None:
      return default
    if not _KINDS[kind](v):
      article = "an" if kind[0] in "aeiou" else "a"
      raise bad_request(
        f"'{self.name(key)}' must be {article} {kind}, got {json_type(v)} {_short(v)}", self.name(key), "invalid_type"
      )
    return v

  def check(self, ok: bool, key: str, value, must: str) -> None:
    if not ok:
      raise bad_request(
        f"invalid value for '{self.name(key)}': {_short(value)}; it must be {must}", self.name(key), "invalid_value"
      )


def _short(v) -> str:
  s = repr(v)
  return s if len(s) <= 80 else s[:77] + "..."


# ---- prompts ----------------------------------------------------------------------------------


def check_model(f: Fields, info: ModelInfo) -> None:
  """`model` is optional; when given it must be the served one (404, OpenAI's model_not_found)."""
  model = f.get("model", "string")
  if model is not None and model != info.name:
    raise APIError(
      404, f"the model '{model}' does not exist; this server serves '{info.name}'", "model", "model_not_found"
    )


def token_ids(v, name: str, info: ModelInfo) -> list:
  """A non-empty list of in-vocabulary token ids, or a 400 naming `name`."""
  if not isinstance(v, list) or not all(_KINDS["integer"](t) for t in v):
    raise bad_request(f"'{name}' must be an array of integer token ids", name, "invalid_type")
  if not v:
    raise bad_request(f"'{name}' is empty: a request needs at least one prompt token", name, "empty_prompt")
  bad = [t for t in v if not 0 <= t < info.vocab_size]
  if bad:
    raise bad_request(
      f"'{name}' holds token ids {bad[:5]} outside the model's vocabulary 0..{info.vocab_size - 1}",
      name,
      "invalid_token_ids",
    )
  return list(v)


def text_ids(text: str, name: str, tokenizer, add_special_tokens: bool = False) -> list:
  """add_special_tokens: with the special tokens (BOS) the tokenizer adds to an input itself."""
  if not text:
    raise bad_request(f"'{name}' is empty: a request needs at least one prompt token", name, "empty_prompt")
  encode_prompt = getattr(tokenizer, "encode_prompt", tokenizer.encode)
  ids = encode_prompt(text) if add_special_tokens else tokenizer.encode(text)
  if not ids:
    raise bad_request(f"'{name}' encodes to no tokens", name, "empty_prompt")
  return ids


def completion_prompts(v, info: ModelInfo, tokenizer, add_special_tokens: bool = False) -> tuple[list, list]:
  """OpenAI's prompt forms -> (each prompt's token ids, its text): a string, an array of token ids,
  or a batch, an array of strings or of token-id arrays (one completion per prompt). A prompt given
  as token ids has the text they decode to; a text prompt gets the tokenizer's own special
  tokens when add_special_tokens."""
  if v is None:
    raise bad_request("missing required field 'prompt'", "prompt", "missing_field")
  if isinstance(v, str):
    return [text_ids(v, "prompt", tokenizer, add_special_tokens)], [v]
  if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
    return [text_ids(p, f"prompt[{i}]", tokenizer, add_special_tokens) for i, p in enumerate(v)], list(v)
  if isinstance(v, list) and v and all(isinstance(p, list) for p in v):
    ids = [token_ids(p, f"prompt[{i}]", info) for i, p in enumerate(v)]
    return ids, [tokenizer.decode(p) for p in ids]
  if isinstance(v, list) and any(isinstance(p, (str, list)) for p in v):
    raise bad_request(
      "'prompt' mixes kinds: a batch is an array of strings or an array of token-id arrays, not both",
      "prompt",
      "invalid_type",
    )
  if isinstance(v, list):
    ids = token_ids(v, "prompt", info)
    return [ids], [tokenizer.decode(ids)]
  raise bad_request(
    f"'prompt' must be a string, an array of token ids, or an array of strings or of token-id arrays "
    f"(a batch); got {json_type(v)}",
    "prompt",
    "invalid_type",
  )


def _zero_max_tokens(f: Fields, key: str, allowed: bool, why: str) -> bool:
  """Whether `key` is 0 (nothing generated: the prompt only); a 400 unless `allowed`."""
  zero = f.given(key) and f.get(key, "integer") == 0
  if zero:
    f.check(allowed, key, 0, f"an integer >= 1 (0 only {why})")
  return zero


def _fits_context(prompt_len: int, key: str, info: ModelInfo) -> None:
  if prompt_len > info.context:
    raise bad_request(
      f"the prompt is {prompt_len} tokens, more than the context of {info.context} tokens; shorten it",
      key,
      "context_length_exceeded",
    )


def chat_messages(v) -> list[dict]:
  """OpenAI messages -> [{"role", "content": str[, "name"]}] for the chat template. Text content
  parts are joined with newlines (vLLM's "string" content format); other parts are rejected."""
  if v is None:
    raise bad_request("missing required field 'messages'", "messages", "missing_field")
  if not isinstance(v, list) or not v:
    raise bad_request("'messages' must be a non-empty array of messages", "messages", "invalid_type")
  out = []
  for i, m in enumerate(v):
    f = Fields(m, MESSAGE_FIELDS, f"messages[{i}]")
    role = f.get("role", "string")
    f.check(role in CHAT_ROLES, "role", role, f"one of {', '.join(CHAT_ROLES)}")
    content = m.get("content")
    if isinstance(content, list):
      texts = []
      for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":  # before the field check: say what is wrong, not which key
          raise bad_request(
            f"'{where}' is a {kind!r} part; this server serves text models and takes only 'text' parts",
            f"{where}.type",
            "unsupported_content",
          )
        texts.append(Fields(part, {"type", "text"}, where).get("text", "string", ""))
      content = "\n".join(texts)
    elif content is None:
      if role != "assistant":
        raise bad_request(
          f"'messages[{i}].content' is required for a {role} message", f"messages[{i}].content", "missing_field"
        )
      content = ""
    elif not isinstance(content, str):
      raise bad_request(
        f"'messages[{i}].content' must be a string or an array of text parts, got {json_type(content)}",
        f"messages[{i}].content",
        "invalid_type",
      )
    msg = {"role": role, "content": content}
    if f.given("name"):
      msg["name"] = f.get("name", "string")
    if f.given("tool_calls"):  # history: the calls an assistant turn made (OpenAI's shape, as sent)
      calls = f.get("tool_calls", "array")
      f.check(all(isinstance(c, dict) for c in calls), "tool_calls", calls, "an array of tool-call objects")
      if calls:
        msg["tool_calls"] = calls
    if f.given("tool_call_id"):
      msg["tool_call_id"] = f.get("tool_call_id", "string")
    out.append(msg)
  return out


# ---- tools (function calling; jaxllm.serve.http.tools) ---------------------------------------------

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


def chat_tools(f: Fields, fmt: str) -> tool_calls.ToolRequest | None:
  """`tools`, `tool_choice` and `parallel_tool_calls` -> a ToolRequest; None without tools (an empty
  list counts as none, as in vLLM). "required" needs tools ("auto" without any is "none"); a named
  choice, one of them.
  fmt: the model's call format (ChatTemplate.tool_format)."""
  raw = f.get("tools", "array", [])
  tools, names = [], set()
  for i, t in enumerate(raw):
    where = f"tools[{i}]"
    tf = Fields(t, {"type", "function"}, where)
    kind = tf.get("type", "string")
    tf.check(kind == "function", "type", kind, '"function" (the only tool type served)')
    if not tf.given("function"):
      raise bad_request(f"missing required field '{where}.function'", f"{where}.function", "missing_field")
    fn = Fields(tf.get("function", "object"), {"name", "description", "parameters", "strict"}, f"{where}.function")
    if not fn.given("name"):
      raise bad_request(f"missing required field '{where}.function.name'", f"{where}.function.name", "missing_field")
    name = fn.get("name", "string")
    fn.check(_TOOL_NAME.fullmatch(name) is not None, "name", name, "1-64 letters, digits, '_' or '-'")
    fn.check(name not in names, "name", name, "unique among the tools")
    names.add(name)
    fn.get("description", "string")
    fn.get("strict", "boolean")
    params = fn.get("parameters", "object")
    if params is not None:
      fn.check(params.get("type", "object") == "object", "parameters", params, 'a JSON schema of "type": "object"')
    function = {k: v for k, v in fn.obj.items() if v is not None}
    tools.append({"type": "function", "function": function})
  choice = f.obj.get("tool_choice")
  function = None
  if isinstance(choice, dict):
    cf = Fields(choice, {"type", "function"}, "tool_choice")
    cf.check(cf.get("type", "string") == "function", "type", choice.get("type"), '"function"')
    function = Fields(cf.get("function", "object", {}), {"name"}, "tool_choice.function").get("name", "string")
    if function is None:
      raise bad_request("missing 'tool_choice.function.name'", "tool_choice.function.name", "missing_field")
    f.check(
      function in names, "tool_choice", choice, f"a function of 'tools' ({', '.join(sorted(names)) or 'none given'})"
    )
    choice = "function"
  elif choice is not None:
    f.check(
      choice in tool_calls.CHOICES,
      "tool_choice",
      choice,
      f"one of {', '.join(tool_calls.CHOICES)} or {{'type': 'function', 'function': {{'name': ...}}}}",
    )
    f.check(choice != "required" or tools, "tool_choice", choice, "'none' or 'auto' when no 'tools' are given")
  parallel = f.get("parallel_tool_calls", "boolean", True)
  if not tools:
    return None
  return tool_calls.ToolRequest(tuple(tools), choice or "auto", function, parallel, fmt)


def _with_tool_grammar(sampling: list, tools, template) -> list:
  """A required or named tool_choice constrains every choice to calls (tools.grammar), checked here
  so a `parameters` schema the grammar engine cannot take is the client's 400."""
  g = template.tool_grammar(tools) if tools else None
  if g is None:
    return sampling
  if any(sp.grammar is not None for sp in sampling):
    raise bad_request(
      f"tool_choice {tools.choice!r} already constrains the output to tool calls; drop the other "
      "structured-output field (response_format or a guided_* grammar)",
      "tool_choice",
      "invalid_value",
    )
  try:
    grammar.grammar_text(*g)
  except ValueError as e:
    raise bad_request(f"the tools' 'parameters' schemas cannot be enforced: {e}", "tools", "invalid_value") from None
  return [dataclasses.replace(sp, grammar=g) for sp in sampling]


def _history_tool_calls(v, i: int) -> list[dict]:
  """An assistant message's `tool_calls` as the chat template gets them: arguments as an object when
  they are a JSON object's text (Hugging Face templates write `arguments | tojson`; vLLM does the same)."""
  where = f"messages[{i}].tool_calls"
  if not isinstance(v, list):
    raise bad_request(f"'{where}' must be an array of tool calls, got {json_type(v)}", where, "invalid_type")
  out = []
  for j, call in enumerate(v):
    cf = Fields(call, {"id", "type", "function"}, f"{where}[{j}]")
    cf.check(cf.get("type", "string", "function") == "function", "type", call.get("type"), '"function"')
    fn = Fields(cf.get("function", "object", {}), {"name", "arguments"}, f"{where}[{j}].function")
    name, args = fn.get("name", "string"), fn.get("arguments", "string", "{}")
    if name is None:
      raise bad_request(f"missing '{where}[{j}].function.name'", f"{where}[{j}].function.name", "missing_field")
    try:
      parsed = json.loads(args)
    except ValueError:
      parsed = None
    item = {"type": "function", "function": {"name": name, "arguments": parsed if isinstance(parsed, dict) else args}}
    if cf.given("id"):
      item["id"] = cf.get("id", "string")
    out.append(item)
  return out


def chat_history(v) -> list[dict]:
  """chat_messages, keeping the tool fields of a conversation for the template: an assistant's
  `tool_calls` and a tool message's `tool_call_id` (null ones are dropped)."""
  if not isinstance(v, list):
    return chat_messages(v)
  plain, extras = [], []
  for i, m in enumerate(v):
    extra = {}
    if isinstance(m, dict):
      if m.get("tool_calls") is not None:
        if m.get("role") != "assistant":
          raise bad_request(f"'messages[{i}].tool_calls' is only for assistant messages", f"messages[{i}].tool_calls")
        extra["tool_calls"] = _history_tool_calls(m["tool_calls"], i)
      if m.get("tool_call_id") is not None:
        if m.get("role") != "tool":
          raise bad_request(f"'messages[{i}].tool_call_id' is only for tool messages", f"messages[{i}].tool_call_id")
        if not isinstance(m["tool_call_id"], str):
          where = f"messages[{i}].tool_call_id"
          raise bad_request(f"'{where}' must be a string, got {json_type(m['tool_call_id'])}", where, "invalid_type")
        extra["tool_call_id"] = m["tool_call_id"]
      m = {k: x for k, x in m.items() if k not in ("tool_calls", "tool_call_id")}
    plain.append(m)
    extras.append(extra)
  return [msg | extra for msg, extra in zip(chat_messages(plain), extras)]


# ---- sampling ---------------------------------------------------------------------------------


def _stop(f: Fields, key: str = "stop") -> tuple:
  v = f.obj.get(key)
  if v is None:
    return ()
  stops = [v] if isinstance(v, str) else v
  if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
    raise bad_request(
      f"'{f.name(key)}' must be a string or an array of strings, got {json_type(v)}", f.name(key), "invalid_type"
    )
  f.check(len(stops) <= MAX_STOP, key, v, f"at most {MAX_STOP} strings")
  f.check(all(stops), key, v, "non-empty strings")
  return tuple(stops)


def _logit_bias(f: Fields, info: ModelInfo) -> tuple:
  """OpenAI's {"token id": bias in [-100, 100]} -> ((id, bias), ...)."""
  bias = f.get("logit_bias", "object", {})
  out = []
  for key, value in bias.items():
    f.check(
      re.fullmatch(r"[0-9]{1,10}", key) is not None and int(key) < info.vocab_size,
      "logit_bias",
      {key: value},
      f"keyed by token ids 0..{info.vocab_size - 1} (as strings)",
    )
    f.check(_KINDS["number"](value) and -100 <= value <= 100, "logit_bias", {key: value}, "biases in [-100, 100]")
    out.append((int(key), float(value)))
  return tuple(out)


def _max_tokens(f: Fields, keys: tuple, prompt_key: str, prompt_len: int, info: ModelInfo, default: int | None) -> int:
  """The completion length: the first of `keys` given, else `default` (None: the rest of the context)
  capped by the context. A given value that does not fit is a 400, a default is shortened."""
  room = info.context - prompt_len
  if room < 1:
    raise bad_request(
      f"the prompt is {prompt_len} tokens but the context is {info.context} "
      f"(model.max_seq_len, capped by the KV pool): no room for a completion; shorten the prompt",
      prompt_key,
      "context_length_exceeded",
    )
  given = [k for k in keys if f.given(k)]
  if len(given) > 1 and len({f.get(k, "integer") for k in given}) > 1:
    raise bad_request(f"'{given[0]}' and '{given[1]}' disagree; give one of them", given[1], "invalid_value")
  if not given:
    return room if default is None else min(default, room)
  key = given[0]
  n = f.get(key, "integer")
  f.check(n >= 1, key, n, "an integer >= 1")
  if prompt_len + n > info.context:
    raise bad_request(
      f"this request needs {prompt_len} prompt + {n} completion tokens = {prompt_len + n}, "
      f"more than the context of {info.context} tokens (model.max_seq_len, capped by the KV "
      f"pool); shorten the prompt or lower '{key}'",
      key,
      "context_length_exceeded",
    )
  return n


def _sampling(
  f: Fields,
  info: ModelInfo,
  max_tokens: int,
  *,
  seed_key="seed",
  min_tokens_key="min_tokens",
  temperature_max: float | None = 2.0,
  logprobs=False,
  top_logprobs=0,
  stop_token_ids=(),
  include_stop_key="include_stop_str_in_output",
) -> list:
  """One SamplingParams per choice from the sampling fields shared by every API (OpenAI's ranges;
  temperature_max None: SGLang's, no upper bound). A field the request omits takes the model's
  generation_config.json value when it has one (info.defaults), else the API's default."""
  d = info.defaults
  n = f.get("n", "integer", 1)
  f.check(1 <= n <= info.max_n, "n", n, f"in 1..{info.max_n} (serve.max_n)")
  temperature = f.get("temperature", "number", d.get("temperature", 1.0))  # OpenAI's and SGLang's default
  if temperature_max is None:
    f.check(0 <= temperature <= FLOAT32_MAX, "temperature", temperature, f">= 0 and <= {FLOAT32_MAX:g} (0 = greedy)")
  else:
    f.check(
      0 <= temperature <= temperature_max, "temperature", temperature, f"in [0, {temperature_max:g}] (0 = greedy)"
    )
  top_p = f.get("top_p", "number", d.get("top_p", 1.0))
  f.check(0 < top_p <= 1, "top_p", top_p, "in (0, 1]")
  top_k = f.get("top_k", "integer", d.get("top_k", 0))
  f.check(-1 <= top_k <= INT32_MAX, "top_k", top_k, f"an integer in 1..{INT32_MAX}, or 0 / -1 for no top-k")
  min_p = f.get("min_p", "number", d.get("min_p", 0.0))
  f.check(0 <= min_p <= 1, "min_p", min_p, "in [0, 1]")
  penalties = {}
  for key in ("presence_penalty", "frequency_penalty"):
    penalties[key] = f.get(key, "number", 0.0)
    f.check(-2 <= penalties[key] <= 2, key, penalties[key], "in [-2, 2]")
  repetition = f.get("repetition_penalty", "number", d.get("repetition_penalty", 1.0))
  f.check(0 < repetition <= FLOAT32_MAX, "repetition_penalty", repetition, f"> 0 and <= {FLOAT32_MAX:g} (1 = off)")
  min_tokens = f.get(min_tokens_key, "integer", 0)
  f.check(0 <= min_tokens <= max_tokens, min_tokens_key, min_tokens, f"in 0..{max_tokens} (the max tokens)")
  ignore_eos = f.get("ignore_eos", "boolean", False)
  seed = f.get(seed_key, "integer")
  if seed is not None:
    f.check(SEED_MIN <= seed <= SEED_MAX, seed_key, seed, f"in {SEED_MIN}..{SEED_MAX} (a 64-bit integer)")
  stops = tuple(stop_token_ids) + (() if ignore_eos else info.eos_ids)
  kw = dict(
    max_tokens=max_tokens,
    temperature=float(temperature),
    top_k=max(top_k, 0),
    top_p=float(top_p),
    min_p=float(min_p),
    stop=_stop(f),
    stop_token_ids=tuple(dict.fromkeys(stops)),
    logprobs=logprobs,
    top_logprobs=top_logprobs,
    presence_penalty=float(penalties["presence_penalty"]),
    frequency_penalty=float(penalties["frequency_penalty"]),
    repetition_penalty=float(repetition),
    logit_bias=_logit_bias(f, info),
    min_tokens=min_tokens,
    ignore_eos=ignore_eos,
    grammar=structured_output(f),
    skip_special_tokens=f.get("skip_special_tokens", "boolean", True),
    include_stop_str_in_output=f.get(include_stop_key, "boolean", False),
  )
  try:
    # Seeded choices get seed, seed+1, ...: reproducible, and still distinct from each other.
    seeds = [None if seed is None else (seed + i - SEED_MIN) % 2**64 + SEED_MIN for i in range(n)]  # wraps
    return [with_random_seed(SamplingParams(**kw, seed=s)) for s in seeds]
  except ValueError as e:  # SamplingParams' own checks: the message names the field
    m = re.match(r"invalid (\w+)=", str(e))
    raise bad_request(str(e), m.group(1) if m else None, "invalid_value") from None


def structured_output(f: Fields) -> tuple | None:
  """SamplingParams.grammar (jaxllm.serve.grammar) from whichever structured-output field the request
  has (at most one), checked here so a bad schema, regex or grammar is a 400 naming its field.
    response_format  {"type": "text"} (no constraint), {"type": "json_object"}, or {"type": "json_schema",
                     "json_schema": {"name", "schema", "strict", "description"}} (OpenAI; the schema is
                     enforced whether strict is true or not)
    guided_json, guided_regex, guided_grammar (GBNF/EBNF or Lark), guided_choice (strings)   vLLM
    structured_outputs {"json" | "regex" | "grammar" | "choice" | "json_object": true}          vLLM
    json_schema (a JSON string), regex, ebnf                              SGLang /generate sampling_params
  """
  found = []  # (field name, (kind, spec))
  if f.given("response_format"):
    rf = Fields(f.obj["response_format"], {"type", "json_schema"}, f.name("response_format"))
    kind = rf.get("type", "string")
    rf.check(kind in ("text", "json_object", "json_schema"), "type", kind, "'text', 'json_object' or 'json_schema'")
    if kind == "json_object":
      found.append((rf.name("type"), ("json_object", "")))
    elif kind == "json_schema":
      if not rf.given("json_schema"):
        raise bad_request(
          "'response_format.json_schema' is required when the type is 'json_schema'",
          rf.name("json_schema"),
          "missing_field",
        )
      js = Fields(rf.obj["json_schema"], {"name", "schema", "strict", "description"}, rf.name("json_schema"))
      js.get("name", "string"), js.get("description", "string"), js.get("strict", "boolean")
      if not js.given("schema"):
        raise bad_request(f"missing required field '{js.name('schema')}'", js.name("schema"), "missing_field")
      found.append((js.name("schema"), ("json_schema", js.get("schema", "object"))))
  so = (
    Fields(
      f.obj["structured_outputs"], {"json", "regex", "grammar", "choice", "json_object"}, f.name("structured_outputs")
    )
    if f.given("structured_outputs")
    else None
  )
  for src, key, kind in (
    (f, "guided_json", "json_schema"),
    (f, "guided_regex", "regex"),
    (f, "guided_grammar", "ebnf"),
    (f, "guided_choice", "choice"),
    (so, "json", "json_schema"),
    (so, "regex", "regex"),
    (so, "grammar", "ebnf"),
    (so, "choice", "choice"),
    (f, "json_schema", "json_schema"),  # SGLang: the schema as a JSON string
    (f, "regex", "regex"),
    (f, "ebnf", "ebnf"),
  ):
    if src is None or not src.given(key):
      continue
    v = src.obj[key]
    if kind == "choice":
      src.check(
        isinstance(v, list) and v and all(isinstance(c, str) and c for c in v),
        key,
        v,
        "a non-empty array of non-empty strings",
      )
      found.append((src.name(key), ("lark", "start: " + " | ".join(json.dumps(c) for c in v))))
    elif kind == "json_schema" and isinstance(v, dict):
      found.append((src.name(key), (kind, v)))
    else:
      found.append((src.name(key), (kind, src.get(key, "string"))))
  if so is not None and so.get("json_object", "boolean", False):
    found.append((so.name("json_object"), ("json_object", "")))
  if len(found) > 1:
    names = [name for name, _ in found]
    raise bad_request(
      f"give one structured-output constraint, not {len(found)}: {', '.join(names)}", names[1], "invalid_value"
    )
  if not found:
    return None
  name, g = found[0]
  try:
    return grammar_text_checked(g)
  except ValueError as e:
    raise bad_request(f"invalid '{name}': {e}", name, "invalid_grammar") from None


def grammar_text_checked(g) -> tuple:
  """(kind, spec) normalised and its grammar built (cached): ValueError when llguidance rejects it."""
  g = grammar.normalize(g)
  grammar.grammar_text(*g)
  return g


def _stop_token_ids(f: Fields, info: ModelInfo) -> tuple:
  """vLLM's stop_token_ids: more ids that end a completion (besides the model's EOS ids)."""
  ids = f.get("stop_token_ids", "array", [])
  f.check(
    all(_KINDS["integer"](t) and 0 <= t < info.vocab_size for t in ids),
    "stop_token_ids",
    ids,
    f"an array of token ids in 0..{info.vocab_size - 1}",
  )
  return tuple(ids)


def _chat_options(f: Fields) -> dict:
  """ChatTemplate.encode's options from vLLM's chat fields: add_generation_prompt (default true),
  continue_final_message (continue the last message; it drops the generation prompt, and asking for
  both is a 400 as in vLLM), chat_template_kwargs (template variables), add_special_tokens (default
  false: templates write their own BOS)."""
  add_generation_prompt = f.get("add_generation_prompt", "boolean", True)
  continue_final = f.get("continue_final_message", "boolean", False)
  if continue_final and f.get("add_generation_prompt", "boolean", False):
    raise bad_request(
      "cannot set both 'continue_final_message' and 'add_generation_prompt' to true: continue the final "
      "message, or start a new assistant message after it",
      "continue_final_message",
      "invalid_value",
    )
  variables = f.get("chat_template_kwargs", "object", {})
  reserved = [k for k in variables if k in RESERVED_TEMPLATE_VARIABLES]
  f.check(
    not reserved,
    "chat_template_kwargs",
    variables,
    f"an object of extra template variables, without {', '.join(RESERVED_TEMPLATE_VARIABLES)} (the server sets them)",
  )
  return {
    "add_generation_prompt": add_generation_prompt,
    "continue_final_message": continue_final,
    "variables": variables,
    "add_special_tokens": f.get("add_special_tokens", "boolean", False),
  }


def _stream(f: Fields) -> tuple[bool, bool]:
  """(stream, stream_options.include_usage)."""
  stream = f.get("stream", "boolean", False)
  include_usage = False
  if f.given("stream_options"):
    if not stream:
      raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
    opts = Fields(f.obj["stream_options"], {"include_usage"}, "stream_options")
    include_usage = opts.get("include_usage", "boolean", False)
  return stream, include_usage


# ---- the three APIs ---------------------------------------------------------------------------


def parse_completion(body, info: ModelInfo, tokenizer) -> Parsed:
  """A batch (prompt: an array of strings or of token-id arrays) gets n choices per prompt, prompt
  after prompt (choice index = prompt index * n + sample). echo: each choice's text (and logprobs)
  starts with its prompt's; echo with logprobs and max_tokens 0 scores the prompt only (lm-eval's
  loglikelihood requests): its tokens' log-probs, the first one null (OpenAI, vLLM)."""
  f = Fields(body, COMPLETION_FIELDS, noop=NOOP_VALUES)
  check_model(f, info)
  # vLLM's default: the tokenizer's own special tokens (BOS), as a Hugging Face model saw text in training.
  add_special = f.get("add_special_tokens", "boolean", info.defaults.get("add_special_tokens", True))
  prompts, texts = completion_prompts(body.get("prompt"), info, tokenizer, add_special)
  echo = f.get("echo", "boolean", False)
  logprobs = None if body.get("logprobs") is False else f.get("logprobs", "integer")  # false: none (vLLM)
  if logprobs is not None:
    f.check(0 <= logprobs <= MAX_COMPLETION_LOGPROBS, "logprobs", logprobs, f"in 0..{MAX_COMPLETION_LOGPROBS}")
  top = logprobs or 0  # logprobs=k: the sampled token's and the k likeliest alternatives
  zero = _zero_max_tokens(f, "max_tokens", echo, "with 'echo': the prompt alone")
  stream, include_usage = _stream(f)
  sampling = []
  for i, prompt in enumerate(prompts):
    key = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
    if zero:
      _fits_context(len(prompt), key, info)
      max_tokens = 1  # nothing is generated; the sampling fields are still checked
    else:
      default_max = info.defaults.get("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
      max_tokens = _max_tokens(f, ("max_tokens",), key, len(prompt), info, default_max)
    sampling += _sampling(
      f, info, max_tokens, logprobs=logprobs is not None, top_logprobs=top, stop_token_ids=_stop_token_ids(f, info)
    )
  return Parsed(
    prompts[0],
    sampling,
    stream,
    include_usage,
    logprobs is not None,
    top,
    f.get("return_token_ids", "boolean", False),
    prompts=prompts,
    prompt_texts=texts,
    echo=echo,
    prompt_logprobs=top if echo and logprobs is not None else -1,
    generate=not zero,
  )


def parse_chat(body, info: ModelInfo, template) -> Parsed:
  """`template`: a jaxllm.serve.http.chat.ChatTemplate (messages -> prompt token ids)."""
  f = Fields(body, CHAT_FIELDS, noop=NOOP_VALUES)
  check_model(f, info)
  tools = chat_tools(f, template.tool_format)
  prompt = template.encode(
    chat_history(body.get("messages")), tools=list(tools.tools) if tools else None, **_chat_options(f)
  )
  logprobs = f.get("logprobs", "boolean", False)
  top = f.get("top_logprobs", "integer", 0)
  f.check(0 <= top <= TOP_LOGPROBS, "top_logprobs", top, f"in 0..{TOP_LOGPROBS}")
  f.check(top == 0 or logprobs, "top_logprobs", top, "0 unless 'logprobs' is true")
  # Chat has no default length: the completion may fill the context (OpenAI, vLLM).
  max_tokens = _max_tokens(
    f, ("max_completion_tokens", "max_tokens"), "messages", len(prompt), info, info.defaults.get("max_tokens")
  )
  stream, include_usage = _stream(f)
  sampling = _with_tool_grammar(
    _sampling(f, info, max_tokens, logprobs=logprobs, top_logprobs=top, stop_token_ids=_stop_token_ids(f, info)),
    tools,
    template,
  )
  return Parsed(
    prompt, sampling, stream, include_usage, logprobs, top, f.get("return_token_ids", "boolean", False), tools
  )


def _generate_prompts(f: Fields, key: str, info: ModelInfo, tokenizer) -> tuple[list, bool]:
  """/generate's `text` (a string or a batch of strings) or `input_ids` (token ids or a batch of
  token-id arrays) -> (each prompt's ids, whether it is a batch)."""
  v = f.obj[key]
  batch = isinstance(v, list) and bool(v) and all(isinstance(p, str if key == "text" else list) for p in v)
  if key == "text":
    texts = v if batch else [f.get("text", "string")]
    return [text_ids(t, f"text[{i}]" if batch else "text", tokenizer) for i, t in enumerate(texts)], batch
  return [token_ids(p, f"input_ids[{i}]", info) for i, p in enumerate(v)] if batch else [token_ids(v, key, info)], batch


def parse_generate(body, info: ModelInfo, tokenizer) -> Parsed:
  """SGLang's /generate: {"text" | "input_ids", "sampling_params": {...}, "stream", "return_logprob"}.
  Defaults follow SGLang (temperature 1, max_new_tokens 128 shortened to fit the context). A batch
  (text: an array of strings, input_ids: an array of token-id arrays) gets a list of responses, n per
  prompt, prompt after prompt. The prompt's log-probs: with return_prompt_logprob, or SGLang's
  return_logprob with logprob_start_len >= 0 (reported from that position on)."""
  f = Fields(body, GENERATE_FIELDS)
  if not f.given("text") and not f.given("input_ids"):
    raise bad_request("missing the prompt: give 'text' or 'input_ids'", "text", "missing_field")
  if f.given("text") and f.given("input_ids"):
    raise bad_request("give one of 'text' and 'input_ids', not both", "text", "invalid_value")
  prompt_key = "text" if f.given("text") else "input_ids"
  prompts, batch = _generate_prompts(f, prompt_key, info, tokenizer)
  s = Fields(f.get("sampling_params", "object", {}), GENERATE_SAMPLING_FIELDS, "sampling_params")
  stop_ids = s.get("stop_token_ids", "array", [])
  s.check(len(stop_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", stop_ids, f"at most {MAX_STOP_TOKEN_IDS} ids")
  s.check(
    all(_KINDS["integer"](t) and 0 <= t < info.vocab_size for t in stop_ids),
    "stop_token_ids",
    stop_ids,
    f"token ids in 0..{info.vocab_size - 1}",
  )
  logprobs = f.get("return_logprob", "boolean", False)
  start = f.get("logprob_start_len", "integer", -1)  # SGLang's default: no prompt log-probs
  f.check(start >= -1, "logprob_start_len", start, ">= 0, or -1 for none")
  prompt_logprob = f.get("return_prompt_logprob", "boolean", False) or (logprobs and start >= 0)
  top = f.get("top_logprobs_num", "integer", 0)
  f.check(0 <= top <= TOP_LOGPROBS, "top_logprobs_num", top, f"in 0..{TOP_LOGPROBS}")
  zero = _zero_max_tokens(s, "max_new_tokens", prompt_logprob, "with the prompt's log-probs: the prompt alone")
  sampling = []
  for i, prompt in enumerate(prompts):
    key = f"{prompt_key}[{i}]" if batch else prompt_key
    if zero:
      _fits_context(len(prompt), key, info)
      max_tokens = 1  # nothing is generated; the sampling fields are still checked
    else:
      max_tokens = _max_tokens(
        s, ("max_new_tokens",), key, len(prompt), info, info.defaults.get("max_tokens", GENERATE_DEFAULT_MAX_NEW_TOKENS)
      )
    sampling += _sampling(
      s,
      info,
      max_tokens,
      seed_key="sampling_seed",
      min_tokens_key="min_new_tokens",
      temperature_max=None,
      logprobs=logprobs,
      top_logprobs=top if logprobs else 0,
      stop_token_ids=stop_ids,
      include_stop_key="no_stop_trim",
    )
  return Parsed(
    prompts[0],
    sampling,
    f.get("stream", "boolean", False),
    False,
    logprobs,
    top if logprobs else 0,
    True,
    prompts=prompts if batch else None,
    prompt_logprobs=top if prompt_logprob else -1,
    generate=not zero,
    logprob_start=max(start, 0),
  )
