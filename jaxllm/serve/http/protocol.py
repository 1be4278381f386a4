"""Request bodies -> validated generation requests, for the three APIs the server speaks:
OpenAI completions, OpenAI chat completions and SGLang's native /generate.

Every field a client sends is read here with its type and range, and every problem is an APIError
(400, or 404 for an unknown model) whose message names the field and what it must be. A field this
server does not implement is rejected by name ("unsupported field 'suffix'"), never silently ignored:
a client relying on it would otherwise get a different behaviour than it asked for. JSON null
counts as absent (OpenAI clients send it for "not given").

The result, `Parsed`, holds token ids and one SamplingParams per choice (n > 1 = n engine requests;
with a seed s they get seeds s, s+1, ...; without one, each gets a random seed so they differ).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from jaxllm.serve.http.errors import APIError, bad_request
from jaxllm.serve.sampling import TOP_LOGPROBS, SamplingParams, with_random_seed

MAX_STOP = 4  # OpenAI: up to 4 stop sequences
MAX_COMPLETION_LOGPROBS = 5  # OpenAI completions: logprobs in 0..5
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI completions default
GENERATE_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang default

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
COMPLETION_FIELDS = _OPENAI_COMMON | {"prompt", "echo"}
CHAT_FIELDS = _OPENAI_COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
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
}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ModelInfo:
  """What validation needs to know about the served model."""

  name: str  # the model id of the API
  vocab_size: int  # token ids 0..vocab_size-1
  context: int  # prompt + completion tokens at most (max_seq_len, capped by the KV pool)
  eos_ids: tuple  # the model's end-of-sequence ids (jaxllm.io.eos_ids): stop tokens unless ignore_eos
  max_n: int  # serve.max_n


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
  up front. `where` prefixes names in messages ("sampling_params.top_k")."""

  def __init__(self, obj, allowed: set, where: str = ""):
    if not isinstance(obj, dict):
      raise bad_request(f"{where or 'the request body'} must be a JSON object, got {json_type(obj)}", where or None)
    self.obj, self.where = obj, where
    for key in obj:
      if key not in allowed:
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


def text_ids(text: str, name: str, tokenizer) -> list:
  if not text:
    raise bad_request(f"'{name}' is empty: a request needs at least one prompt token", name, "empty_prompt")
  ids = tokenizer.encode(text)
  if not ids:
    raise bad_request(f"'{name}' encodes to no tokens", name, "empty_prompt")
  return ids


def completion_prompts(v, info: ModelInfo, tokenizer) -> tuple[list, list]:
  """OpenAI's prompt forms -> (each prompt's token ids, its text): a string, an array of token ids,
  or a batch, an array of strings or of token-id arrays (one completion per prompt). A prompt given
  as token ids has the text they decode to."""
  if v is None:
    raise bad_request("missing required field 'prompt'", "prompt", "missing_field")
  if isinstance(v, str):
    return [text_ids(v, "prompt", tokenizer)], [v]
  if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
    return [text_ids(p, f"prompt[{i}]", tokenizer) for i, p in enumerate(v)], list(v)
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
    f = Fields(m, {"role", "content", "name"}, f"messages[{i}]")
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
    out.append(msg)
  return out


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
      re.fullmatch(r"\d+", key) is not None and int(key) < info.vocab_size,
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
) -> list:
  """One SamplingParams per choice from the sampling fields shared by every API (OpenAI's ranges;
  temperature_max None: SGLang's, no upper bound)."""
  n = f.get("n", "integer", 1)
  f.check(1 <= n <= info.max_n, "n", n, f"in 1..{info.max_n} (serve.max_n)")
  temperature = f.get("temperature", "number", 1.0)  # OpenAI's and SGLang's default
  if temperature_max is None:
    f.check(temperature >= 0, "temperature", temperature, ">= 0 (0 = greedy)")
  else:
    f.check(
      0 <= temperature <= temperature_max, "temperature", temperature, f"in [0, {temperature_max:g}] (0 = greedy)"
    )
  top_p = f.get("top_p", "number", 1.0)
  f.check(0 < top_p <= 1, "top_p", top_p, "in (0, 1]")
  top_k = f.get("top_k", "integer", 0)
  f.check(top_k >= -1, "top_k", top_k, "an integer >= 1, or 0 / -1 for no top-k")
  min_p = f.get("min_p", "number", 0.0)
  f.check(0 <= min_p <= 1, "min_p", min_p, "in [0, 1]")
  penalties = {}
  for key in ("presence_penalty", "frequency_penalty"):
    penalties[key] = f.get(key, "number", 0.0)
    f.check(-2 <= penalties[key] <= 2, key, penalties[key], "in [-2, 2]")
  repetition = f.get("repetition_penalty", "number", 1.0)
  f.check(repetition > 0, "repetition_penalty", repetition, "> 0 (1 = off)")
  min_tokens = f.get(min_tokens_key, "integer", 0)
  f.check(0 <= min_tokens <= max_tokens, min_tokens_key, min_tokens, f"in 0..{max_tokens} (the max tokens)")
  ignore_eos = f.get("ignore_eos", "boolean", False)
  seed = f.get(seed_key, "integer")
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
  )
  try:
    # Seeded choices get seed, seed+1, ...: reproducible, and still distinct from each other.
    return [with_random_seed(SamplingParams(**kw, seed=None if seed is None else seed + i)) for i in range(n)]
  except ValueError as e:  # SamplingParams' own checks: the message names the field
    m = re.match(r"invalid (\w+)=", str(e))
    raise bad_request(str(e), m.group(1) if m else None, "invalid_value") from None


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
  f = Fields(body, COMPLETION_FIELDS)
  check_model(f, info)
  prompts, texts = completion_prompts(body.get("prompt"), info, tokenizer)
  echo = f.get("echo", "boolean", False)
  logprobs = f.get("logprobs", "integer")
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
      max_tokens = _max_tokens(f, ("max_tokens",), key, len(prompt), info, COMPLETION_DEFAULT_MAX_TOKENS)
    sampling += _sampling(f, info, max_tokens, logprobs=logprobs is not None, top_logprobs=top)
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
  f = Fields(body, CHAT_FIELDS)
  check_model(f, info)
  prompt = template.encode(chat_messages(body.get("messages")))
  logprobs = f.get("logprobs", "boolean", False)
  top = f.get("top_logprobs", "integer", 0)
  f.check(0 <= top <= TOP_LOGPROBS, "top_logprobs", top, f"in 0..{TOP_LOGPROBS}")
  f.check(top == 0 or logprobs, "top_logprobs", top, "0 unless 'logprobs' is true")
  # Chat has no default length: the completion may fill the context (OpenAI, vLLM).
  max_tokens = _max_tokens(f, ("max_completion_tokens", "max_tokens"), "messages", len(prompt), info, None)
  stream, include_usage = _stream(f)
  return Parsed(
    prompt,
    _sampling(f, info, max_tokens, logprobs=logprobs, top_logprobs=top),
    stream,
    include_usage,
    logprobs,
    top,
    f.get("return_token_ids", "boolean", False),
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
      max_tokens = _max_tokens(s, ("max_new_tokens",), key, len(prompt), info, GENERATE_DEFAULT_MAX_NEW_TOKENS)
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
