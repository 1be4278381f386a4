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

Field reading lives in fields.py, chat's own fields (messages, tools, template options) in
chat_request.py, structured-output fields in structured.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from jaxllm.serve.http import tools as tool_calls
from jaxllm.serve.http.chat_request import chat_history, chat_options, chat_tools, with_tool_grammar
from jaxllm.serve.http.errors import APIError, bad_request
from jaxllm.serve.http.fields import KINDS, Fields, json_type
from jaxllm.serve.http.structured import STRUCTURED_GENERATE_FIELDS, STRUCTURED_OPENAI_FIELDS, structured_output
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

COMPLETION_FIELDS |= STRUCTURED_OPENAI_FIELDS
CHAT_FIELDS |= STRUCTURED_OPENAI_FIELDS
GENERATE_SAMPLING_FIELDS |= STRUCTURED_GENERATE_FIELDS


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
  if not isinstance(v, list) or not all(KINDS["integer"](t) for t in v):
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
    f.check(KINDS["number"](value) and -100 <= value <= 100, "logit_bias", {key: value}, "biases in [-100, 100]")
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


def _stop_token_ids(f: Fields, info: ModelInfo) -> tuple:
  """vLLM's stop_token_ids: more ids that end a completion (besides the model's EOS ids)."""
  ids = f.get("stop_token_ids", "array", [])
  f.check(
    all(KINDS["integer"](t) and 0 <= t < info.vocab_size for t in ids),
    "stop_token_ids",
    ids,
    f"an array of token ids in 0..{info.vocab_size - 1}",
  )
  return tuple(ids)


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
    chat_history(body.get("messages")), tools=list(tools.tools) if tools else None, **chat_options(f)
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
  sampling = with_tool_grammar(
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
    all(KINDS["integer"](t) and 0 <= t < info.vocab_size for t in stop_ids),
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
