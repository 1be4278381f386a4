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

Request options (vLLM's chat fields): `variables` are the request's chat_template_kwargs, passed to the
template beside `messages` (e.g. Qwen3's enable_thinking); `continue_final_message` renders without
the generation prompt and cuts the text right after the last message's content, so the model
continues that message instead of starting a new one (transformers' apply_chat_template rule);
`add_special_tokens` adds the special tokens the tokenizer adds to any input (its BOS), which
templates usually write themselves.

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
    self.special_prefix, self.special_suffix = _added_specials(tokenizer)

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

  def encode(
    self,
    messages: list[dict],
    tools: list | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    variables: dict | None = None,
    add_special_tokens: bool = False,
  ) -> list[int]:
    """Prompt token ids. The rendered text is encoded without an extra BOS unless add_special_tokens:
    templates that want one write {{ bos_token }}, and Hugging Face tokenizers turn special-token
    text into its id. tools: the request's tools, passed to the template as apply_chat_template does."""
    extra = dict(variables or {}) | ({"tools": tools} if tools is not None else {})
    try:
      text = self.format.render_for_encoding(messages, add_generation_prompt and not continue_final_message, **extra)
    except jinja2.TemplateError as e:
      raise bad_request(f"the chat template rejected these messages: {e}", "messages", "invalid_messages") from None
    except TypeError as e:  # a chat_template_kwargs value the template cannot use
      raise bad_request(f"the chat template failed with chat_template_kwargs: {e}", "chat_template_kwargs") from None
    if continue_final_message:
      text = _cut_after_final_message(text, messages[-1]["content"])
    ids = self.format.encode_text(text)
    if add_special_tokens:
      ids = self.special_prefix + ids + self.special_suffix
    if not ids:
      raise bad_request("the chat template rendered these messages to an empty prompt", "messages", "empty_prompt")
    return ids


def _cut_after_final_message(text: str, final: str) -> str:
  """The rendered conversation up to the end of the final message's content, as transformers'
  apply_chat_template(continue_final_message=True) cuts it (the template may trim its spaces)."""
  if final.strip() not in text:
    raise bad_request(
      "continue_final_message is set but the final message does not appear in the rendered chat "
      "(the chat template rewrites it); send the conversation without continue_final_message",
      "continue_final_message",
      "invalid_value",
    )
  at = text.rindex(final.strip())
  if text[at : at + len(final.lstrip())] == final:
    return text[: at + len(final.lstrip())]
  return text[: at + len(final.strip())]


def _added_specials(tokenizer) -> tuple[list[int], list[int]]:
  """(ids before, ids after) that the tokenizer adds around any input (its BOS, for Llama), found by
  encoding a probe with and without them; ([], []) for a tokenizer that adds none."""
  encode_prompt = getattr(tokenizer, "encode_prompt", None)
  if encode_prompt is None:
    return [], []
  plain, full = tokenizer.encode("a"), encode_prompt("a")
  for i in range(len(full) - len(plain) + 1):
    if full[i : i + len(plain)] == plain:
      return full[:i], full[i + len(plain) :]
  return [], []
