"""Chat templates: messages -> text -> token ids, for the server's prompts and for SFT on conversations.

A template is Jinja source, the model's own when it has one (a Hugging Face tokenizer_config.json's
"chat_template", or chat_template.json / chat_template.jinja beside tokenizer.json), rendered the way
transformers' apply_chat_template renders it: a sandboxed Jinja environment (templates come with
downloaded models and must not reach Python internals), trim_blocks/lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, `{% generation %}` blocks
(rendered as their body), and the variables `messages`, `add_generation_prompt`, `bos_token` and
`eos_token`.

A model without one (the byte tokenizer, a jaxllm run's own) gets DEFAULT_TEMPLATE, a plain transcript,
the same for training and serving:

  system: You are terse.
  user: Hi!
  assistant: Hello.<eos>
  user: 2+2?
  assistant:                  (the generation prompt)

each turn "role: content" and a newline, an assistant turn's content followed by the eos token, so a
model trained on it stops after its answer. With tools (function calling), a first line lists them
(`tools: [{"type": "function", "function": {...}}]`) and an assistant turn's calls follow its content
as <tool_call>{"name": ..., "arguments": {...}}</tool_call> (the hermes format the server parses).

Special tokens: a template's {{ bos_token }} / {{ eos_token }} become the token's id when encoded. A
Hugging Face tokenizer has their text ("</s>"), which encodes to the id; the byte tokenizer's specials
have no text, so they are rendered as private markers that `encode` replaces by the ids (and as "" in
`render`'s display text).

SFT on conversations (`sft_segments`): the loss covers the assistant turns only. An assistant turn
messages[i] spans the text that rendering messages[:i+1] (no generation prompt) adds to rendering
messages[:i] with the generation prompt; that is found prefix by prefix for any template. Everything
else (system and user turns, the generation prompt, the template's own text) is masked out; the span
holds the assistant's content and whatever the template writes to close the turn (its end-of-turn
token, and any text after it up to the next turn). Each segment is encoded on its own, so a token
never straddles a masked / trained boundary, and the prompt of the first assistant turn is encoded
exactly as the server encodes that prompt. A turn whose prefix renders differently inside the whole
conversation (templates that rewrite earlier turns, e.g. dropping their reasoning) cannot be located:
it is masked out and counted.
"""

from __future__ import annotations

import datetime
import json
import re

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
  "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
  "{% for message in messages %}"
  "{{ message['role'] }}: {{ message['content'] }}"
  "{% for call in message['tool_calls'] or [] %}"
  "<tool_call>{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}</tool_call>"
  "{% endfor %}"
  "{{ eos_token if message['role'] == 'assistant' else '' }}\n"
  "{% endfor %}"
  "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Stand-ins for special tokens that have no text (the byte tokenizer's); private-use characters, so
# no real text collides with them.
_MARKERS = {"bos_token": "\ue000bos\ue001", "eos_token": "\ue000eos\ue001"}
_MARKER_RE = re.compile("(" + "|".join(map(re.escape, _MARKERS.values())) + ")")


def _raise_exception(message):
  raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # As transformers: Jinja's own tojson HTML-escapes <, >, & and ', which templates do not want.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(jinja2.ext.Extension):
  """{% generation %}...{% endgeneration %} (transformers' assistant-mask markup): renders its body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.Scope(body, lineno=lineno)


def compile_template(source: str) -> jinja2.Template:
  """The Jinja template of `source` in a sandboxed environment set up as transformers sets it up; a
  ValueError naming the line when it does not compile."""
  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation]
  )
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  env.filters["tojson"] = _tojson
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise ValueError(f"the chat template does not compile: {e} (line {e.lineno})") from e


def _token_text(tokenizer, token_id) -> str:
  """The text of a special token: a Hugging Face tokenizer knows it; the byte tokenizer's have none."""
  inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps a `tokenizers.Tokenizer`
  if inner is None or token_id is None:
    return ""
  return inner.id_to_token(token_id) or ""


class ChatFormat:
  """A chat template bound to a tokenizer. source None (or "") means DEFAULT_TEMPLATE.

  render(messages) -> text (jinja2.TemplateError when the template rejects the messages, e.g. its
  raise_exception); encode(messages) -> prompt token ids; sft_segments(messages) -> the trained and
  masked pieces of a conversation (see the module docstring)."""

  def __init__(self, source: str | None, tokenizer):
    self.source = source or DEFAULT_TEMPLATE
    self.is_default = not source
    self.tokenizer = tokenizer
    self.template = compile_template(self.source)
    self._display, self._marked, self._ids = {}, {}, {}
    for name, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
      text = _token_text(tokenizer, token_id)
      self._display[name] = text
      if text or token_id is None:
        self._marked[name] = text
      else:
        self._marked[name] = _MARKERS[name]
        self._ids[_MARKERS[name]] = int(token_id)

  def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The text of the conversation (specials without text shown as ""). variables: more template
    variables (e.g. `tools`, as apply_chat_template passes them)."""
    return self.template.render(
      messages=messages, add_generation_prompt=add_generation_prompt, **variables, **self._display
    )

  def _render(self, messages, add_generation_prompt: bool, **variables) -> str:
    return self.template.render(
      messages=messages, add_generation_prompt=add_generation_prompt, **variables, **self._marked
    )

  def render_for_encoding(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The text `encode_text` turns into prompt ids (specials without text as markers), rendered with
    extra template variables (a server request's chat_template_kwargs, e.g. enable_thinking)."""
    return self.template.render(
      messages=messages, add_generation_prompt=add_generation_prompt, **{**variables, **self._marked}
    )

  def pieces(self, text: str) -> list[str | int]:
    """Rendered text as pieces to encode (str) and special-token ids (int, where a marker stood)."""
    if not self._ids:
      return [text] if text else []
    return [self._ids.get(p, p) for p in _MARKER_RE.split(text) if p]

  def encode_text(self, text: str) -> list[int]:
    """Token ids of rendered text (markers -> the specials' ids). No BOS is added: templates that want
    one write {{ bos_token }}, and Hugging Face tokenizers turn special-token text into its id."""
    ids = []
    for piece in self.pieces(text):
      if isinstance(piece, int):
        ids.append(piece)
      else:
        ids += self.tokenizer.encode(piece)
    return ids

  def encode(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> list[int]:
    """Token ids of the rendered conversation (with the generation prompt by default: a prompt)."""
    return self.encode_text(self._render(messages, add_generation_prompt, **variables))

  def sft_segments(self, messages: list[dict]) -> tuple[list[tuple[str, bool]], int]:
    """-> ([(text, trained)], turns not located): the rendered conversation (no generation prompt)
    cut into pieces, trained=True for the assistant spans, each piece to be encoded on its own (pieces /
    encode_text). Raises jinja2.TemplateError when the template rejects the whole conversation."""
    if self._ids:
      for i, m in enumerate(messages):
        if _MARKER_RE.search(str(m.get("content", ""))):
          raise ValueError(f"messages[{i}].content holds the marker reserved for special tokens ({_MARKERS})")
    full = self._render(messages, False)
    pieces, pos, missed = [], 0, 0
    for i, m in enumerate(messages):
      if m.get("role") != "assistant":
        continue
      try:
        start, end = self._render(messages[:i], True), self._render(messages[: i + 1], False)
      except jinja2.TemplateError:
        start = end = None  # e.g. a template that needs a first message to render messages[:0]
      if start is None or not (len(start) >= pos and end.startswith(start) and full.startswith(end)):
        missed += 1
        continue
      pieces += [(full[pos : len(start)], False), (full[len(start) : len(end)], True)]
      pos = len(end)
    pieces.append((full[pos:], False))
    return [(text, trained) for text, trained in pieces if text], missed
