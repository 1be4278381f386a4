"""Chat messages -> prompt text -> token ids, through a Jinja chat template.

The template is the model's own when its Hugging Face directory has one (tokenizer_config.json,
chat_template.json or chat_template.jinja; see jaxllm.io.hf_chat_template), rendered the way
transformers renders it: a sandboxed Jinja environment (templates come with downloaded models and
must not reach Python internals), trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`,
`bos_token`/`eos_token` and `add_generation_prompt=True`.

A model without one (a jaxllm training run: its corpus has no chat turns) gets DEFAULT_TEMPLATE, a
plain transcript any model can continue:

  system: You are terse.
  user: Hi!
  assistant:

Rendering errors (a template's raise_exception, e.g. "roles must alternate") are the client's
400s; a template that does not compile fails at startup.
"""

from __future__ import annotations

import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxllm.serve.http.errors import bad_request

DEFAULT_TEMPLATE = (
  "{% for message in messages %}"
  "{{ message['role'] }}: {{ message['content'] }}\n"
  "{% endfor %}"
  "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _raise_exception(message):
  raise jinja2.TemplateError(message)


def _token_text(tokenizer, token_id) -> str:
  """The text of a special token for templates that write it ({{ bos_token }}): a Hugging Face
  tokenizer knows it; the byte tokenizer's specials have none, so ""."""
  inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps a `tokenizers.Tokenizer`
  if inner is None or token_id is None:
    return ""
  return inner.id_to_token(token_id) or ""


class ChatTemplate:
  def __init__(self, source: str | None, tokenizer):
    self.source = source or DEFAULT_TEMPLATE
    self.is_default = source is None
    self.tokenizer = tokenizer
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      self.template = env.from_string(self.source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f"the model's chat template does not compile: {e} (line {e.lineno})") from e
    self.specials = {
      "bos_token": _token_text(tokenizer, getattr(tokenizer, "bos_id", None)),
      "eos_token": _token_text(tokenizer, getattr(tokenizer, "eos_id", None)),
    }

  def render(self, messages: list[dict]) -> str:
    try:
      return self.template.render(messages=messages, add_generation_prompt=True, **self.specials)
    except jinja2.TemplateError as e:
      raise bad_request(f"the chat template rejected these messages: {e}", "messages", "invalid_messages") from None

  def encode(self, messages: list[dict]) -> list[int]:
    """Prompt token ids. The rendered text is encoded without an extra BOS: templates that want
    one write {{ bos_token }}, and Hugging Face tokenizers turn special-token text into its id."""
    ids = self.tokenizer.encode(self.render(messages))
    if not ids:
      raise bad_request("the chat template rendered these messages to an empty prompt", "messages", "empty_prompt")
    return ids
