"""No compile after warm-up: request fields never select a compiled shape (sampling arrays have fixed
widths, the penalty state is a fixed device store), so after Engine.warmup() a mixed workload through
HTTP -- penalties, logit_bias of 1..300 entries, stop ids of several counts, n = 1..4, min_tokens,
different lengths, streamed and not, JSON-schema, regex and EBNF grammars -- compiles nothing,
as the server's /metrics counts it."""

import dataclasses
import json
import random
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families
from test_http import CFG, MODEL, SERVE, Server, start_server

# Two buckets of sequences (8, 16) and of tokens (32, 64), multi-step decode: 7 shapes to warm.
LAYOUT = dataclasses.replace(
  SERVE, max_running=16, min_seqs=8, chunk_size=64, min_tokens=32, decode_steps=4, max_n=4, max_body_bytes=65_536
)


def warmed_server():
  """A server on LAYOUT, ready: its warm-up (Engine.warmup on the engine thread) is done."""
  return start_server(serve_cfg=LAYOUT)


def compiles(http) -> float:
  r = http.get("/metrics")
  assert r.status_code == 200
  fams = {f.name: f for f in text_string_to_metric_families(r.text)}
  return fams["jaxllm:compiles"].samples[0].value


def workload(n_requests: int, seed: int = 0) -> list[tuple[str, dict]]:
  """(path, body) pairs: every request field that used to pick a shape, in many sizes."""
  rng = random.Random(seed)
  bias_sizes = [1, 2, 7, 9, 31, 64, 150, 300]
  out = []
  for i in range(n_requests):
    text = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(1, 60)))
    max_tokens = rng.randint(2, 40)
    sp = {"max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.8]), "seed": i, "n": rng.randint(1, 4)}
    sp["stream"] = i % 3 == 0
    if i % 2:
      sp["presence_penalty"], sp["frequency_penalty"] = rng.uniform(-2, 2), rng.uniform(-2, 2)
    if i % 4 == 1:
      sp["repetition_penalty"] = rng.uniform(0.5, 1.5)
    if i % 5 != 4:
      k = bias_sizes[i % len(bias_sizes)]
      sp["logit_bias"] = {str(t): rng.uniform(-5, 5) for t in rng.sample(range(CFG.vocab_size), k)}
    if i % 3 == 1:
      sp["min_tokens"] = rng.randint(0, max_tokens)
    if i % 2 == 0:  # native /generate takes stop_token_ids
      stop_ids = rng.sample(range(CFG.vocab_size), rng.choice([1, 3, 12, 40, 100]))
      native = {
        "max_new_tokens": sp.pop("max_tokens"),
        "min_new_tokens": sp.pop("min_tokens", 0),
        "sampling_seed": sp.pop("seed"),
        "stop_token_ids": stop_ids,
      }
      out.append(("/generate", {"text": text, "stream": sp.pop("stream"), "sampling_params": sp | native}))
    else:
      out.append(("/v1/completions", {"model": MODEL, "prompt": text, **sp}))
  # Structured output: the grammar's token mask has a fixed shape too.
  schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}}, "required": ["a"]}
  fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
  chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
  out += [
    ("/v1/completions", {"model": MODEL, "prompt": "j", "max_tokens": 40, "response_format": fmt, "n": 2}),
    ("/v1/completions", {"model": MODEL, "prompt": "r", "max_tokens": 12, "guided_regex": "[0-9]{3}-[a-z]+"}),
    ("/v1/chat/completions", chat | {"response_format": fmt, "stream": True, "temperature": 0.8, "seed": 1}),
    ("/v1/completions", {"model": MODEL, "prompt": "g", "max_tokens": 12, "guided_grammar": 'root ::= "ab" [0-9]+'}),
  ]
  return out


def send(srv: Server, path: str, body: dict) -> None:
  with srv.http() as http:
    if body.get("stream"):
      with http.stream("POST", path, json=body) as r:
        lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200, lines
      assert lines[-1] == "data: [DONE]", lines[-3:]
      json.loads(lines[0].removeprefix("data: "))
      return
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text


def test_mixed_workload_compiles_nothing_after_warmup():
  with warmed_server() as srv, srv.http() as http:
    warm = compiles(http)
    assert warm == srv.engine.compiles >= 7  # decode and multi x 2, ragged x 2, the penalty-store fill
    with ThreadPoolExecutor(8) as pool:  # concurrent: batches of many sizes and mixes
      list(pool.map(lambda req: send(srv, *req), workload(28)))
    assert srv.engine.stats.generated_tokens > 200
    assert compiles(http) == warm, "a request field selected a new compiled shape"
