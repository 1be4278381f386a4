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

Tools (jaxllm.serve.http.tools): a request's tools reach the template as `tools`, as
apply_chat_template passes them; DEFAULT_TEMPLATE lists them on a first `tools: [...]` line and writes
an assistant's calls in the hermes format (<tool_call>{"name": ..., "arguments": ...}</tool_call>).
`tool_format` is the call format the model answers in (the template's, or serve.tool_parser).

Rendering errors (a template's raise_exception, e.g. "roles must alternate") are the client's
400s; a template that does not compile fails at startup.
"""

from __future__ import annotations

import jinja2

from jaxllm.data.chat import DEFAULT_TEMPLATE, ChatFormat
from jaxllm.serve.http import tools as tool_calls
from jaxllm.serve.http.errors import bad_request

__all__ = ["DEFAULT_TEMPLATE", "ChatTemplate"]


class ChatTemplate:
  def __init__(self, source: str | None, tokenizer, tool_parser: str = "auto"):
    self.format = ChatFormat(source, tokenizer)  # a ValueError when the template does not compile
    self.source, self.is_default, self.tokenizer = self.format.source, self.format.is_default, tokenizer
    self.tool_format = tool_calls.template_format(source, tool_parser)

  def is_token(self, text: str) -> bool:
    """Whether the tokenizer has `text` as one added token (as Qwen's <tool_call>)."""
    inner = getattr(self.tokenizer, "tokenizer", None)  # HFTokenizer wraps a `tokenizers.Tokenizer`
    return inner is not None and any(t.content == text for t in inner.get_added_tokens_decoder().values())

  def tool_grammar(self, request) -> tuple | None:
    """The grammar enforcing a tool_calls.ToolRequest's required / named choice (None for none / auto)."""
    return tool_calls.grammar(request, self.is_token)

  def render(self, messages: list[dict], tools: list | None = None) -> str:
    try:
      return self.format.render(messages, add_generation_prompt=True, tools=tools)
    except jinja2.TemplateError as e:
      raise bad_request(f"the chat template rejected these messages: {e}", "messages", "invalid_messages") from None

  def encode(self, messages: list[dict], tools: list | None = None) -> list[int]:
    """Prompt token ids. The rendered text is encoded without an extra BOS: templates that want
    one write {{ bos_token }}, and Hugging Face tokenizers turn special-token text into its id."""
    try:
      ids = self.format.encode(messages, add_generation_prompt=True, tools=tools)
    except jinja2.TemplateError as e:
      raise bad_request(f"the chat template rejected these messages: {e}", "messages", "invalid_messages") from None
    if not ids:
      raise bad_request("the chat template rendered these messages to an empty prompt", "messages", "empty_prompt")
    return ids
