"""Reading a JSON request body field by field: each field's JSON type, its range, and an APIError
(400) naming the field and what it must be. JSON null counts as absent; a field in `noop` is accepted
only with the value that changes nothing (see jaxllm.serve.http.protocol)."""

from __future__ import annotations

import math

from jaxllm.serve.http.errors import bad_request

MAX_JSON_DEPTH = 64  # nesting of a request body (a JSON schema included) at most


def check_json(v, where: str = "", depth: int = 0) -> None:
  """A parsed body holds only text the tokenizer can take (Python's json accepts a lone UTF-16
  surrogate such as "\\ud800", which no UTF-8 text holds) and nests at most MAX_JSON_DEPTH deep."""
  if depth > MAX_JSON_DEPTH:
    raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
  if isinstance(v, str):
    try:
      v.encode("utf-8")
    except UnicodeEncodeError:
      raise bad_request(
        f"'{where or 'the request body'}' holds a lone UTF-16 surrogate, which is not text",
        where or None,
        "invalid_json",
      ) from None
  elif isinstance(v, dict):
    for key, value in v.items():
      name = f"{where}.{key}" if where else str(key)
      check_json(key, where, depth + 1)
      check_json(value, name, depth + 1)
  elif isinstance(v, list):
    for i, value in enumerate(v):
      check_json(value, f"{where}[{i}]", depth + 1)


def json_type(v) -> str:
  if isinstance(v, bool):
    return "boolean"
  return {int: "integer", float: "number", str: "string", list: "array", dict: "object", type(None): "null"}.get(
    type(v), type(v).__name__
  )


KINDS = {
  "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
  "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
  "boolean": lambda v: isinstance(v, bool),
  "string": lambda v: isinstance(v, str),
  "array": lambda v: isinstance(v, list),
  "object": lambda v: isinstance(v, dict),
}


class Fields:
  """The fields of one JSON object, read one at a time with their type; unknown ones are rejected
  up front unless null or a no-op of `noop` (NOOP_VALUES). `where` prefixes names in messages
  ("sampling_params.top_k")."""

  def __init__(self, obj, allowed: set, where: str = "", noop: dict | None = None):
    if not isinstance(obj, dict):
      raise bad_request(f"{where or 'the request body'} must be a JSON object, got {json_type(obj)}", where or None)
    self.obj, self.where = obj, where
    for key, value in obj.items():
      if key in allowed or value is None:
        continue
      if noop and key in noop:
        is_noop, accepted = noop[key]
        if is_noop(value, obj):
          continue
        raise bad_request(
          f"unsupported value for '{self.name(key)}': {_short(value)}; this server accepts it only as {accepted}",
          self.name(key),
          "unsupported_value",
        )
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
    if not KINDS[kind](v):
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
