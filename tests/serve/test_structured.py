"""Structured output (jaxllm.serve.grammar): whatever the weights, a random-weight model's output
parses and validates against the request's JSON schema, matches its regex or grammar.

The model is test_http's tiny one (byte tokenizer, vocab 384 > the tokenizer's 259 ids, so the mask
also has to rule out ids no token has); a tiny Hugging Face BPE tokenizer covers the other path.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import openai
import pytest
from test_http import CFG, EOS, MODEL, SERVE, TOK, start_server
from test_serve import params_of

from jaxllm.data import load_tokenizer
from jaxllm.serve import grammar
from jaxllm.serve.engine import Engine
from jaxllm.serve.grammar import GrammarCompiler, grammar_text, mask_words
from jaxllm.serve.sampling import SamplingParams, apply_token_mask, build_sampling_arrays, process_logits

ENGINE = dataclasses.replace(SERVE, api_key="")

# Five schemas: strings, integers, enums, booleans, arrays, nesting, required and optional fields.
# Lengths are bounded (maxLength, maxItems, integer ranges) so a random model finishes them.
SCHEMAS = [
  {
    "type": "object",
    "properties": {
      "name": {"type": "string", "maxLength": 8},
      "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
  },
  {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
  },
  {
    "type": "object",
    "properties": {
      "ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1, "maxItems": 4}
    },
    "required": ["ids"],
    "additionalProperties": False,
  },
  {
    "type": "object",
    "properties": {
      "user": {
        "type": "object",
        "properties": {
          "id": {"type": "integer", "minimum": 1, "maximum": 99},
          "email": {"type": "string", "maxLength": 10},
        },
        "required": ["id", "email"],
        "additionalProperties": False,
      },
      "active": {"type": "boolean"},
    },
    "required": ["user", "active"],
    "additionalProperties": False,
  },
  {
    "type": "object",
    "properties": {
      "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
      "level": {"enum": [1, 2, 3]},
      "note": {"type": "string", "maxLength": 5},
      "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "yy"]}, "maxItems": 3},
    },
    "required": ["code", "level"],
    "additionalProperties": False,
  },
]
REGEXES = [r"[a-z]{2,5}-[0-9]{1,3}", r"(yes|no|maybe)", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"]
GBNF = 'root ::= greeting " " name\ngreeting ::= "hello" | "hi"\nname ::= [a-z] [a-z]? [a-z]?\n'
GBNF_RE = r"(hello|hi) [a-z]{1,3}"


@pytest.fixture(scope="module")
def engine():
  return Engine(CFG, params_of(CFG), ENGINE, tokenizer=TOK)


def constrained(grammar, seed, max_tokens=100, **kw):
  return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, stop_token_ids=EOS, grammar=grammar, **kw)


def test_json_schemas_hold_whatever_the_weights(engine):
  """50 sampled requests over 5 schemas (in one batch with unconstrained ones): every output parses,
  validates, and finished because its grammar completed."""
  sps = [constrained(("json_schema", SCHEMAS[i % 5]), seed=i) for i in range(50)]
  free = [SamplingParams(max_tokens=30, temperature=1.0, seed=7, stop_token_ids=EOS)] * 2
  results = engine.generate([TOK.encode(f"Request {i}:") for i in range(52)], sps + free)
  for i, r in enumerate(results[:50]):
    text = TOK.decode(r.output)
    assert r.finish_reason == "stop", (i, text)
    jsonschema.validate(json.loads(text), SCHEMAS[i % 5])
  # The unconstrained rows are not JSON at all (random weights): the mask was theirs only.
  assert all(r.finish_reason == "length" and not TOK.decode(r.output).startswith("{") for r in results[50:])


def test_regex_and_ebnf(engine):
  sps = [constrained(("regex", REGEXES[i % 3]), seed=i, max_tokens=40) for i in range(9)]
  sps += [constrained(("ebnf", GBNF), seed=i, max_tokens=40) for i in range(3)]
  sps += [constrained(("lark", 'start: "alpha" | "beta" | "gamma"'), seed=i) for i in range(3)]  # guided_choice
  results = engine.generate([TOK.encode("Answer:")] * len(sps), sps)
  for i, r in enumerate(results):
    text = TOK.decode(r.output)
    pattern = REGEXES[i % 3] if i < 9 else GBNF_RE if i < 12 else "alpha|beta|gamma"
    assert re.fullmatch(pattern, text), (i, text)
    assert r.finish_reason == "stop"
    if i % 3 == 1 or i >= 12:  # a choice is complete at its last letter: it finished there, no EOS spent
      assert r.output[-1] != TOK.eos_id


def test_eos_only_where_the_grammar_accepts(engine):
  """A regex that may end early or go on: with EOS favoured by +100, the output stops exactly at the
  shortest accepting point, with EOS (a stop token) as its last token; ignore_eos keeps it out."""
  bias = ((TOK.eos_id, 100.0),)
  sp = constrained(("regex", r"[a-z]{3,6}"), seed=0, logit_bias=bias)
  r = engine.generate([TOK.encode("x")], [sp])[0]
  assert len(r.output) == 4 and r.output[-1] == TOK.eos_id and re.fullmatch("[a-z]{3}", TOK.decode(r.output))
  no_eos = dataclasses.replace(sp, ignore_eos=True, stop_token_ids=())
  r = engine.generate([TOK.encode("x")], [no_eos])[0]
  assert re.fullmatch("[a-z]{6}", TOK.decode(r.output)) and r.finish_reason == "stop"


def test_json_object_and_greedy(engine):
  """json_object: a bias for '}' cannot make the output start with it; greedy rows are masked too."""
  bias = ((ord("}"), 100.0), (ord("x"), 50.0))
  r = engine.generate([TOK.encode("{")], [constrained(("json_object", ""), 0, logit_bias=bias)])[0]
  assert TOK.decode(r.output) == "{}" and r.finish_reason == "stop"
  greedy = dataclasses.replace(constrained(("regex", "[0-9]{4}"), 0), temperature=0.0)
  assert re.fullmatch("[0-9]{4}", TOK.decode(engine.generate([TOK.encode("a")], [greedy])[0].output))


def test_grammar_batches_chain_and_equal_the_plain_path(engine):
  """With overlap a grammar batch's decode is chained as a forward behind the running step and a
  sampling after the host's mask update; the outputs equal those of the engine without overlap."""
  sps = [constrained(("json_schema", SCHEMAS[i % 5]), seed=i) for i in range(6)]
  sps += [SamplingParams(max_tokens=25, temperature=1.0, seed=9, stop_token_ids=EOS)]
  prompts = [TOK.encode(f"Item {i}:") for i in range(len(sps))]
  plain = Engine(CFG, params_of(CFG), ENGINE, tokenizer=TOK, overlap=False)
  want = [r.output for r in plain.generate(prompts, sps)]
  chained = engine.chained
  assert [r.output for r in engine.generate(prompts, sps)] == want
  assert engine.chained - chained > 20  # most of the ~40 decode steps were chained


def test_no_compile_after_warmup(engine):
  """The mask is a fixed-width array every step carries: grammar requests select no new shape."""
  engine.warmup()
  before = engine.compiles
  sps = [constrained(("json_schema", SCHEMAS[0]), 1), SamplingParams(max_tokens=20, stop_token_ids=EOS)]
  engine.generate([TOK.encode("hi")] * 2, sps)
  assert engine.compiles == before


@pytest.mark.parametrize(
  "grammar, needle",
  [
    (("json_schema", '{"type": "objekt"}'), "objekt"),
    (("json_schema", "{not json"), "json_schema"),
    (("json_schema", {"type": "string", "pattern": "(("}), "regex"),
    (("regex", "a(b"), "unclosed group"),
    (("ebnf", "root ::= missing_rule"), "missing_rule"),
    (("lark", "start: ("), "lark"),
  ],
)
def test_invalid_grammars_are_value_errors(engine, grammar, needle):
  with pytest.raises(ValueError, match=needle):
    engine.add_request(TOK.encode("x"), constrained(grammar, 0))
  assert not engine.sched.waiting


def test_malformed_grammar_field():
  for bad in [("yaml", "a: 1"), ("regex",), "json", ("regex", "")]:
    with pytest.raises(ValueError, match="invalid grammar="):
      SamplingParams(grammar=bad)


def test_compiled_grammars_are_cached():
  comp = GrammarCompiler(TOK, CFG.vocab_size, cache_size=2)
  a = comp.compile(("regex", "[ab]+"))
  assert comp.compile(("regex", "[ab]+")) is a
  comp.compile(("regex", "c+"))
  comp.compile(("regex", "d+"))  # evicts the oldest
  assert comp.compile(("regex", "[ab]+")) is not a
  assert grammar_text.cache_info().hits > 0


def test_parallel_fill_equals_serial(monkeypatch):
  """llguidance's threaded fill (large vocabularies) gives the masks the one-by-one fill gives."""
  comp = GrammarCompiler(TOK, CFG.vocab_size)
  rows = [comp.matcher(("json_schema", SCHEMAS[i]), EOS) for i in range(5)]
  for m, prefix in zip(rows, ['{"name":"a', '{"color":"', "", '{"user":{"id":4', '{"code":"AB']):
    assert m.consume(TOK.encode(prefix))
  comp.fill(rows)
  serial = [m.mask.copy() for m in rows]
  monkeypatch.setattr(grammar, "PARALLEL_FILL_VOCAB", 0)
  for m in rows:
    m.mask = None
  comp.fill(rows)
  assert all(np.array_equal(a, m.mask) for a, m in zip(serial, rows))
  assert len({a.tobytes() for a in serial}) == 5


def test_mask_is_applied_on_device():
  """Token t is bit t % 32 of word t // 32; all ones leaves the logits as they were."""
  V, R = 70, 2
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(R, V)), jnp.float32)
  mask = np.full((R, mask_words(V)), -1, np.int32)
  mask[1] = 0
  mask[1, 65 // 32] |= 1 << (65 % 32)
  mask[1, 31 // 32] |= np.uint32(1 << 31).view(np.int32)
  out = np.asarray(jax.jit(apply_token_mask)(logits, jnp.asarray(mask)))
  assert np.array_equal(out[0], np.asarray(logits[0]))
  assert np.flatnonzero(np.isfinite(out[1])).tolist() == [31, 65]
  samp = build_sampling_arrays([SamplingParams(logit_bias={65: -5.0})] * R, [((), [])] * R, R)
  samp |= {"grammar_mask": mask, "gen_counts": np.zeros((R, 0), np.int32), "prompt_mask": np.zeros((R, 0), bool)}
  x = np.asarray(process_logits(logits, samp))
  assert np.flatnonzero(np.isfinite(x[1])).tolist() == [31, 65] and x[1, 65] == pytest.approx(logits[1, 65] - 5)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
  """A tiny byte-level BPE tokenizer.json trained on JSON-like text (multi-byte tokens like '{"')."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=350, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(['{"name": "bob", "age": 12, "color": "red", "ok": true}', "hello world"] * 20, trainer)
  path = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
  tok.save(str(path))
  return load_tokenizer(str(path))


def test_hf_tokenizer(hf_tok):
  """The same guarantee through a Hugging Face tokenizer with multi-byte tokens."""
  eng = Engine(CFG, params_of(CFG), ENGINE, tokenizer=hf_tok)
  sps = [
    SamplingParams(max_tokens=80, temperature=1.0, seed=i, stop_token_ids=(hf_tok.eos_id,), grammar=g)
    for i, g in enumerate([("json_schema", SCHEMAS[0]), ("json_schema", SCHEMAS[1])] * 4 + [("regex", REGEXES[0])])
  ]
  results = eng.generate([hf_tok.encode("hello")] * len(sps), sps)
  for i, r in enumerate(results[:8]):
    jsonschema.validate(json.loads(hf_tok.decode(r.output)), SCHEMAS[i % 2])
  assert re.fullmatch(REGEXES[0], hf_tok.decode(results[8].output))
  assert any(len(hf_tok.tokenizer.id_to_token(t)) > 1 for r in results for t in r.output)  # multi-byte tokens used


# ---- over HTTP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv():
  with start_server() as s:
    yield s


def test_openai_response_format(srv):
  """The official client's response_format: json_schema (each schema, n=4, streamed once) and json_object."""
  client = srv.client()
  messages = [{"role": "user", "content": "Give me JSON."}]
  for i, schema in enumerate(SCHEMAS):
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
    r = client.chat.completions.create(
      model=MODEL, messages=messages, max_tokens=90, temperature=1.0, n=4, seed=i, response_format=fmt
    )
    for c in r.choices:
      assert c.finish_reason == "stop"
      jsonschema.validate(json.loads(c.message.content), schema)
  fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[3]}}
  chunks = client.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=90, temperature=1.0, seed=3, response_format=fmt, stream=True
  )
  jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), SCHEMAS[3])
  r = client.chat.completions.create(
    model=MODEL,
    messages=messages,
    max_tokens=20,
    temperature=0,
    response_format={"type": "json_object"},
    logit_bias={str(ord("}")): 100},
  )
  assert r.choices[0].message.content == "{}"
  # {"type": "text"} constrains nothing: the same output as without it.
  plain = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0)
  text = client.chat.completions.create(**plain, response_format={"type": "text"}).choices[0].message.content
  assert text == client.chat.completions.create(**plain).choices[0].message.content


def test_vllm_and_sglang_fields(srv):
  client = srv.client()
  ask = lambda body: client.completions.create(
    model=MODEL, prompt="Answer:", max_tokens=40, temperature=1.0, seed=1, extra_body=body
  )
  assert re.fullmatch(REGEXES[0], ask({"guided_regex": REGEXES[0]}).choices[0].text)
  assert ask({"guided_choice": ["left", "right"]}).choices[0].text in ("left", "right")
  assert re.fullmatch(GBNF_RE, ask({"guided_grammar": GBNF}).choices[0].text)
  jsonschema.validate(json.loads(ask({"guided_json": SCHEMAS[1]}).choices[0].text), SCHEMAS[1])
  assert re.fullmatch(REGEXES[2], ask({"structured_outputs": {"regex": REGEXES[2]}}).choices[0].text)
  assert ask({"structured_outputs": {"choice": ["up", "down"]}}).choices[0].text in ("up", "down")
  with srv.http() as http:
    for params, pattern in [
      ({"json_schema": json.dumps(SCHEMAS[2])}, None),
      ({"regex": REGEXES[1]}, REGEXES[1]),
      ({"ebnf": GBNF}, GBNF_RE),
    ]:
      body = {"text": "Answer:", "sampling_params": {"max_new_tokens": 60, "temperature": 1.0, **params}}
      out = http.post("/generate", json=body).json()
      assert out["meta_info"]["finish_reason"]["type"] == "stop"
      if pattern is None:
        jsonschema.validate(json.loads(out["text"]), SCHEMAS[2])
      else:
        assert re.fullmatch(pattern, out["text"])


@pytest.mark.parametrize(
  "body, field",
  [
    (
      {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
      "response_format.json_schema.schema",
    ),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_grammar": "root ::= nothing_defined"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_json": {"type": "object"}}, "guided_regex"),
    ({"structured_outputs": {"regex": "[", "json": None}}, "structured_outputs.regex"),
    ({"structured_outputs": {"whitespace": 1}}, "structured_outputs.whitespace"),
  ],
)
def test_invalid_constraints_are_400(srv, body, field):
  with srv.http() as http:
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, **body})
  assert r.status_code == 400, r.text
  assert r.json()["error"]["param"] == field
  # The official client raises on it too (the server stays up for the next request).
  with pytest.raises(openai.BadRequestError):
    srv.client().completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body=body)
  assert srv.service.stopped is False


def test_invalid_sglang_constraint_is_400(srv):
  with srv.http() as http:
    body = {"text": "x", "sampling_params": {"json_schema": "{not json", "max_new_tokens": 5}}
    r = http.post("/generate", json=body)
  assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.json_schema"
