"""vLLM's /tokenize, /detokenize and /tokenizer_info: the server's own tokenizer and chat template,
without generating.

  POST /tokenize    {"prompt": str, "add_special_tokens": true}
                 or {"messages": [...], "add_generation_prompt": true, "add_special_tokens": false}
                    (+ "model", "return_token_strs": false)
                    -> {"count", "max_model_len", "tokens", "token_strs"}
  POST /detokenize  {"tokens": [ids]} (+ "model") -> {"prompt": str}
  GET  /tokenizer_info -> {"tokenizer_class", "bos_token", "eos_token", "pad_token", "chat_template",
                          "model_max_length"}  (a special token's text; null when it has none)

lm-eval's remote tokenizer (`tokenizer_backend=remote`, picked automatically when a server has
/tokenizer_info and /tokenize) reads exactly these.

Defaults as vLLM's: add_special_tokens adds the tokenizer's BOS (if it has one) to a prompt; for
messages it is off, since a chat template writes its own special tokens (with it on, a BOS is added
unless the rendered prompt starts with one). Messages go through the same template as
/v1/chat/completions. max_model_len is the context a request may use (prompt + completion).
"""

from __future__ import annotations

import jinja2

from jaxllm.serve.http.chat_request import chat_messages
from jaxllm.serve.http.errors import bad_request
from jaxllm.serve.http.fields import Fields
from jaxllm.serve.http.protocol import ModelInfo, check_model, token_ids

TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}
DETOKENIZE_FIELDS = {"model", "tokens"}


def tokenize(body, info: ModelInfo, tokenizer, template, text_of) -> dict:
  """template: chat.ChatTemplate; text_of: responses.TokenText (a token's own text)."""
  f = Fields(body, TOKENIZE_FIELDS)
  check_model(f, info)
  if f.given("prompt") == f.given("messages"):
    raise bad_request("give one of 'prompt' and 'messages'", "prompt", "missing_field")
  bos = getattr(tokenizer, "bos_id", None)
  if f.given("prompt"):
    if f.given("add_generation_prompt"):
      raise bad_request("'add_generation_prompt' applies to 'messages' only", "add_generation_prompt")
    add_special = f.get("add_special_tokens", "boolean", True)
    ids = tokenizer.encode(f.get("prompt", "string"), add_bos=add_special)
  else:
    add_special = f.get("add_special_tokens", "boolean", False)
    messages = chat_messages(body["messages"])
    try:
      ids = template.format.encode(messages, add_generation_prompt=f.get("add_generation_prompt", "boolean", True))
    except jinja2.TemplateError as e:
      raise bad_request(f"the chat template rejected these messages: {e}", "messages", "invalid_messages") from None
    if add_special and bos is not None and ids[:1] != [bos]:
      ids = [bos] + ids
  out = {"count": len(ids), "max_model_len": info.context, "tokens": ids, "token_strs": None}
  if f.get("return_token_strs", "boolean", False):
    out["token_strs"] = [text_of(t) for t in ids]
  return out


def detokenize(body, info: ModelInfo, tokenizer) -> dict:
  f = Fields(body, DETOKENIZE_FIELDS)
  check_model(f, info)
  if not f.given("tokens"):
    raise bad_request("missing required field 'tokens'", "tokens", "missing_field")
  ids = token_ids(body["tokens"], "tokens", info) if body["tokens"] != [] else []
  return {"prompt": tokenizer.decode(ids)}


def tokenizer_info(info: ModelInfo, tokenizer, template) -> dict:
  inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps a `tokenizers.Tokenizer`

  def text(token_id):
    return None if inner is None or token_id is None else inner.id_to_token(token_id)

  return {
    "tokenizer_class": type(tokenizer).__name__,
    "bos_token": text(getattr(tokenizer, "bos_id", None)),
    "eos_token": text(getattr(tokenizer, "eos_id", None)),
    "pad_token": text(getattr(tokenizer, "pad_id", None)),
    "chat_template": template.source,
    "model_max_length": info.context,
  }
