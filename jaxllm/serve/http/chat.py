"""Chat messages -> prompt text -> token ids, through a Jinja chat template.

The template is the model's own when its Hugging Face directory has one (tokenizer_config.json,
chat_template.json or chat_template.jinja; see jaxllm.io.hf_chat_template), rendered by
jaxllm.data.chat (the one renderer, which SFT training shares: sandboxed as transformers renders it,
with `add_generation_prompt=True` here).

A model without one (a jaxllm training run) gets jaxllm.data.chat.DEFAULT_TEMPLATE, a plain transcript
any model can continue and the one `train.py` trains {"messages"} rows with:

  system: You are terse.
  user: Hi!
  assistant:

Rendering errors (a template's raise_exception, e.g. "roles must alternate") are the client's
400s; a template that does not compile fails at startup.
"""

from __future__ import annotations

import jinja2

from jaxllm.data.chat import DEFAULT_TEMPLATE, ChatFormat
from jaxllm.serve.http.errors import bad_request

__all__ = ["DEFAULT_TEMPLATE", "ChatTemplate"]


class ChatTemplate:
  def __init__(self, source: str | None, tokenizer):
    self.format = ChatFormat(source, tokenizer)  # a ValueError when the template does not compile
    self.source, self.is_default, self.tokenizer = self.format.source, self.format.is_default, tokenizer

  def render(self, messages: list[dict]) -> str:
    try:
      return self.format.render(messages, add_generation_prompt=True)
    except jinja2.TemplateError as e:
      raise bad_request(f"the chat template rejected these messages: {e}", "messages", "invalid_messages") from None

  def encode(self, messages: list[dict]) -> list[int]:
    """Prompt token ids. The rendered text is encoded without an extra BOS: templates that want
    one write {{ bos_token }}, and Hugging Face tokenizers turn special-token text into its id."""
    try:
      ids = self.format.encode(messages, add_generation_prompt=True)
    except jinja2.TemplateError as e:
      raise bad_request(f"the chat template rejected these messages: {e}", "messages", "invalid_messages") from None
    if not ids:
      raise bad_request("the chat template rendered these messages to an empty prompt", "messages", "empty_prompt")
    return ids
