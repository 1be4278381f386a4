"""Chat requests' own fields: the messages (with tool calls and tool results in the history), the
request's tools and tool_choice (jaxllm.serve.http.tools), and vLLM's chat-template options."""

from __future__ import annotations

import dataclasses
import json
import re

from jaxllm.serve import grammar
from jaxllm.serve.http import tools as tool_calls
from jaxllm.serve.http.errors import bad_request
from jaxllm.serve.http.fields import Fields, json_type

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# A chat message's fields; assistant history may carry tool calls, tool results name their call
# (passed to the chat template as they are).
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id"}

# Template variables the server sets itself: chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "bos_token", "eos_token")


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


def with_tool_grammar(sampling: list, tools, template) -> list:
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


def chat_options(f: Fields) -> dict:
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
