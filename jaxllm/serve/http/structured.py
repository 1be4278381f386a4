"""Structured-output request fields -> SamplingParams.grammar (jaxllm.serve.grammar), checked here so
a bad schema, regex or grammar is a 400 naming its field."""

from __future__ import annotations

import json

from jaxllm.serve import grammar
from jaxllm.serve.http.errors import bad_request
from jaxllm.serve.http.fields import Fields

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
