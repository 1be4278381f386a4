"""Prompt log-probs (echo + logprobs on /v1/completions, return_prompt_logprob on /generate), batched
prompts and /tokenize + /detokenize, end to end over HTTP with the official `openai` client.

Reference for every prompt log-prob: a plain full forward of the same params (model_def(cfg).bind(params)
over the prompt alone, log_softmax of its logits), position by position."""

import functools
import threading

import jax
import numpy as np
import pytest
from test_http import CFG, MODEL, TOK, scrape, start_server
from test_serve import DENSE, MOE, params_of

from jaxllm.config import MeshConfig
from jaxllm.model.params import init_params, model_def
from jaxllm.parallel import build_mesh
from jaxllm.serve.engine import Engine
from jaxllm.serve.http.chat import ChatTemplate
from jaxllm.serve.score import Scorer

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away", "héllo wörld: ∑"]


@pytest.fixture(scope="module")
def srv():
  with start_server() as s:
    yield s


@functools.lru_cache(maxsize=None)
def _log_softmax(cfg):
  mdef = model_def(cfg)
  return jax.jit(lambda p, t: jax.nn.log_softmax(mdef.bind(p)(t).logits, -1))


def reference(ids, params=None, cfg=CFG) -> np.ndarray:
  """[len(ids), V] log-probs of the next token at each position, from one full forward of this prompt."""
  params = params_of(cfg) if params is None else params
  return np.asarray(_log_softmax(cfg)(params, np.asarray([ids], np.int32)))[0]


def ref_token_logprobs(ids, params=None, cfg=CFG) -> list:
  lp = reference(ids, params, cfg)
  return [lp[t, ids[t + 1]] for t in range(len(ids) - 1)]


def served_ids(srv, text: str) -> list:
  """The token ids /v1/completions makes of a string prompt (whatever its BOS policy)."""
  r = srv.client().completions.create(
    model=MODEL, prompt=text, echo=True, max_tokens=0, extra_body={"return_token_ids": True}
  )
  return r.choices[0].prompt_token_ids


def test_echo_logprobs_max_tokens_zero_equal_full_forward(srv):
  """lm-eval's loglikelihood request: echo, logprobs=1, max_tokens=0 -> the prompt's log-probs."""
  client = srv.client()
  for prompt in PROMPTS + [TOK.encode(PROMPTS[1])]:
    ids = prompt if isinstance(prompt, list) else served_ids(srv, prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    c = r.choices[0]
    assert c.text == TOK.decode(ids) and c.finish_reason == "length"
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    np.testing.assert_allclose(lp.token_logprobs[1:], ref_token_logprobs(ids), rtol=1e-5, atol=1e-5)
    assert lp.tokens == [TOK.decode([t]) for t in ids]
    assert lp.text_offset == list(np.cumsum([0] + [len(s) for s in lp.tokens[:-1]]))
    ref = reference(ids)
    for t in range(1, len(ids)):  # the one alternative is the likeliest next token
      ((text, value),) = lp.top_logprobs[t].items()
      assert text == TOK.decode([int(np.argmax(ref[t - 1]))])
      np.testing.assert_allclose(value, ref[t - 1].max(), rtol=1e-5, atol=1e-5)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
  # logprobs=3: three alternatives per position, keyed by their text (ids sharing one keep the likeliest).
  ids = served_ids(srv, PROMPTS[0])
  r = client.completions.create(model=MODEL, prompt=PROMPTS[0], echo=True, logprobs=3, max_tokens=0)
  ref = reference(ids)
  for t in range(1, len(ids)):
    want = {}
    for i in np.argsort(-ref[t - 1], kind="stable")[:3]:
      want.setdefault(TOK.decode([int(i)]), ref[t - 1, i])
    got = r.choices[0].logprobs.top_logprobs[t]
    assert list(got) == list(want)
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-5, atol=1e-5)
  with srv.http() as h:  # scoring shapes are compiled on demand and counted apart from the step shapes
    assert scrape(h)["jaxllm:score_compiles_total"] >= 1


def test_echo_with_generation(srv):
  """max_tokens=1 (lm-eval's form) and more: the prompt's text and log-probs, then the generated ones."""
  client = srv.client()
  ids = served_ids(srv, PROMPTS[1])
  ref = reference(ids)
  plain = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=2)
  r = client.completions.create(
    model=MODEL,
    prompt=PROMPTS[1],
    max_tokens=6,
    temperature=0,
    logprobs=2,
    echo=True,
    extra_body={"return_token_ids": True},
  )
  c, p = r.choices[0], plain.choices[0]
  assert c.text == PROMPTS[1] + p.text
  np.testing.assert_allclose(c.logprobs.token_logprobs[1 : len(ids)], ref_token_logprobs(ids), rtol=1e-5, atol=1e-5)
  assert c.logprobs.token_logprobs[len(ids) :] == p.logprobs.token_logprobs  # the engine's own, after the prompt's
  assert c.logprobs.tokens[len(ids) :] == p.logprobs.tokens
  assert c.logprobs.text_offset[len(ids) :] == [len(PROMPTS[1]) + o for o in p.logprobs.text_offset]
  # The first generated token is the reference's argmax after the prompt, with the reference's log-prob.
  assert c.token_ids[0] == int(np.argmax(ref[-1]))
  np.testing.assert_allclose(c.logprobs.token_logprobs[len(ids)], ref[-1].max(), rtol=1e-5, atol=1e-5)
  assert c.prompt_weight_version == c.weight_version == 0 and c.prompt_token_ids == ids
  # echo without logprobs, and streamed: the prompt comes first, in a chunk of its own.
  r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, echo=True)
  assert r.choices[0].text == PROMPTS[1] + p.text and r.choices[0].logprobs is None
  chunks = list(
    client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, echo=True, stream=True)
  )
  assert chunks[0].choices[0].text == PROMPTS[1]
  assert "".join(x.choices[0].text for x in chunks) == PROMPTS[1] + p.text
  chunks = list(
    client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=0, stream=True)
  )
  assert [x.choices[0].finish_reason for x in chunks] == [None, "length"]
  np.testing.assert_allclose(chunks[0].choices[0].logprobs.token_logprobs[1:], ref_token_logprobs(ids), 1e-5, 1e-5)


def test_lm_eval_loglikelihood_payload(srv):
  """lm-eval's local-completions loglikelihood request (a batch of context + continuation token
  lists, max_tokens=1, echo, logprobs=1), read as lm-eval reads it: the continuation's summed
  log-prob and whether every continuation token was the greedy one."""
  pairs = [("The quick brown", " fox"), ("Once upon a", " time"), ("héllo", " wörld")]
  ctx = [TOK.encode(c) for c, _ in pairs]
  reqs = [c + TOK.encode(x) for c, (_, x) in zip(ctx, pairs)]
  ctx.append(TOK.encode("Greedy"))  # and a continuation of the model's own two greedy tokens
  reqs.append(ctx[-1] + [int(np.argmax(reference(ctx[-1])[-1]))])
  reqs[-1].append(int(np.argmax(reference(reqs[-1])[-1])))
  body = {"model": MODEL, "prompt": reqs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
  with srv.http() as h:
    out = h.post("/v1/completions", json=body).json()
  greedy = []
  for choice, c, ids in zip(sorted(out["choices"], key=lambda c: c["index"]), ctx, reqs, strict=True):
    lps = choice["logprobs"]["token_logprobs"][len(c) : -1]
    tops = choice["logprobs"]["top_logprobs"][len(c) : -1]
    ref = reference(ids)
    want = [ref[t - 1, ids[t]] for t in range(len(c), len(ids))]
    np.testing.assert_allclose(sum(lps), sum(want), rtol=1e-5, atol=1e-5)
    greedy.append(all(tok == max(top.values()) for tok, top in zip(lps, tops)))
    assert greedy[-1] == all(ids[t] == np.argmax(ref[t - 1]) for t in range(len(c), len(ids)))
  assert greedy[-1]


def test_batched_prompts_in_openai_order(srv):
  """A batch of n=2: choice index = prompt * 2 + sample, each as its own request would give it."""
  client = srv.client()
  kw = dict(model=MODEL, max_tokens=5, temperature=1.0, seed=11, n=2)
  single = [client.completions.create(prompt=p, **kw) for p in PROMPTS]
  want = [c.text for r in single for c in sorted(r.choices, key=lambda c: c.index)]
  assert want[0] != want[1]  # the two samples of a prompt differ (seeds 11, 12)
  for form in (PROMPTS, [served_ids(srv, p) for p in PROMPTS]):
    r = client.completions.create(prompt=form, **kw)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == want
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in single)
  # Streamed, the chunks name the same indexes.
  texts = [""] * 6
  for chunk in client.completions.create(prompt=PROMPTS, stream=True, **kw):
    for c in chunk.choices:
      texts[c.index] += c.text
  assert texts == want
  # A scored batch: every choice carries its own prompt's log-probs.
  r = client.completions.create(model=MODEL, prompt=PROMPTS, n=2, echo=True, logprobs=0, max_tokens=0)
  for c in r.choices:
    ids = served_ids(srv, PROMPTS[c.index // 2])
    assert c.text == PROMPTS[c.index // 2] and c.logprobs.top_logprobs is None
    np.testing.assert_allclose(c.logprobs.token_logprobs[1:], ref_token_logprobs(ids), rtol=1e-5, atol=1e-5)


def test_generate_return_prompt_logprob(srv):
  ids = TOK.encode(PROMPTS[2])
  ref = reference(ids)
  with srv.http() as h:
    body = {"input_ids": ids, "return_prompt_logprob": True, "top_logprobs_num": 2}
    r = h.post("/generate", json=body | {"sampling_params": {"max_new_tokens": 0}}).json()
    meta = r["meta_info"]
    assert r["output_ids"] == [] and meta["finish_reason"] == {"type": "length"}
    assert [t for _, t, _ in meta["input_token_logprobs"]] == ids
    assert meta["input_token_logprobs"][0][0] is None and meta["input_top_logprobs"][0] is None
    np.testing.assert_allclose(
      [lp for lp, _, _ in meta["input_token_logprobs"][1:]], ref_token_logprobs(ids), rtol=1e-5, atol=1e-5
    )
    for t in range(1, len(ids)):
      assert [i for _, i, _ in meta["input_top_logprobs"][t]] == list(np.argsort(-ref[t - 1], kind="stable")[:2])
    assert meta["prompt_weight_version"] == meta["weight_version"] == 0
    # With generation and return_logprob: the same prompt log-probs, then the output's with top-2.
    r2 = h.post(
      "/generate",
      json=body | {"return_logprob": True, "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
    ).json()["meta_info"]
    assert r2["input_token_logprobs"] == meta["input_token_logprobs"]
    assert len(r2["output_token_logprobs"]) == 4 and all(len(a) == 2 for a in r2["output_top_logprobs"])


def test_scoring_between_steps_follows_weights_and_leaves_streams_alone(srv):
  """Scoring while a stream generates: the stream's text is the one it gets alone, and the scores
  are right; after a weight swap the scores are the new weights' and say so."""
  client = srv.client()
  kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=100, temperature=0, extra_body={"ignore_eos": True})
  alone = client.completions.create(**kw).choices[0].text
  want = [ref_token_logprobs(served_ids(srv, p)) for p in PROMPTS]
  score = lambda p: client.completions.create(model=MODEL, prompt=p, echo=True, logprobs=0, max_tokens=0)
  for p in PROMPTS:  # compiled before the stream starts
    score(p)
  got, first = [], threading.Event()

  def consume():
    for c in client.completions.create(**kw, stream=True):
      got.append(c.choices[0].text)
      first.set()

  stream = threading.Thread(target=consume)
  stream.start()
  assert first.wait(60)
  during = 0
  for i in range(100):  # score until the stream is done (and at least 3 prompts)
    if not stream.is_alive() and i >= 3:
      break
    lps = score(PROMPTS[i % 3]).choices[0].logprobs.token_logprobs
    np.testing.assert_allclose(lps[1:], want[i % 3], rtol=1e-5, atol=1e-5)
    during += stream.is_alive()
  stream.join()
  assert during >= 1
  assert "".join(got) == alone
  new = init_params(CFG, 1)
  srv.service.set_weights(new, "step-1")
  try:
    ids = served_ids(srv, PROMPTS[1])
    r = client.completions.create(
      model=MODEL, prompt=PROMPTS[1], echo=True, logprobs=0, max_tokens=0, extra_body={"return_token_ids": True}
    )
    c = r.choices[0]
    assert c.prompt_weight_version == c.weight_version == "step-1"
    np.testing.assert_allclose(c.logprobs.token_logprobs[1:], ref_token_logprobs(ids, new), rtol=1e-5, atol=1e-5)
  finally:
    srv.service.set_weights(params_of(CFG), 0)


@pytest.mark.parametrize(
  "cfg,mc",
  [(DENSE, MeshConfig(dp=4, tp=2)), pytest.param(MOE, MeshConfig(dp=2, tp=2, ep=4), marks=pytest.mark.slow)],
  ids=["dense-dp4-tp2", "moe-dp2-tp2-ep4"],
)
def test_scorer_on_a_mesh_equals_full_forward(cfg, mc):
  """The scorer runs under the engine's mesh and hooks (sharded weights, expert-parallel MoE)."""
  mesh, plan = build_mesh(mc, jax.devices()[: mc.num_devices])
  eng = Engine(cfg, params_of(cfg), page_size=8, num_pages=64, max_running=4, mesh=mesh, plan=plan)
  rng = np.random.default_rng(0)
  prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in (5, 17, 30)]
  for p, s in zip(prompts, Scorer(eng).score(prompts, 2)):
    np.testing.assert_allclose(s.logprobs[1:], ref_token_logprobs(p, cfg=cfg), rtol=1e-5, atol=1e-5)
    ref = reference(p, cfg=cfg)
    assert [[i for i, _ in alts] for alts in s.top[1:]] == [list(np.argsort(-r)[:2]) for r in ref[:-1]]


def test_generate_batches_and_sglang_logprob_start_len(srv):
  """lm-eval's sglang-generate loglikelihood request: a batch of token lists, return_logprob with
  logprob_start_len=0 and top_logprobs_num=1, one response per prompt; and a text batch with n=2."""
  reqs = [TOK.encode(p) for p in PROMPTS]
  body = {
    "input_ids": reqs,
    "sampling_params": {"max_new_tokens": 1, "temperature": 0},
    "logprob_start_len": 0,
    "top_logprobs_num": 1,
    "return_logprob": True,
  }
  with srv.http() as h:
    out = h.post("/generate", json=body).json()
    assert isinstance(out, list) and len(out) == len(reqs)
    for o, ids in zip(out, reqs):
      meta, ref = o["meta_info"], reference(ids)
      ctx = 3
      np.testing.assert_allclose(
        sum(x[0] for x in meta["input_token_logprobs"][ctx:]), sum(ref_token_logprobs(ids)[ctx - 1 :]), rtol=1e-5
      )
      assert [y[0][1] for y in meta["input_top_logprobs"][1:]] == [int(np.argmax(r)) for r in ref[:-1]]
      assert o["output_ids"] == [int(np.argmax(ref[-1]))]
    # logprob_start_len=k reports positions k.. only; a one-prompt batch is still a list.
    r = h.post("/generate", json=body | {"input_ids": reqs[:1], "logprob_start_len": 4}).json()
    assert [t for _, t, _ in r[0]["meta_info"]["input_token_logprobs"]] == reqs[0][4:]
    kw = {"sampling_params": {"n": 2, "temperature": 1.0, "sampling_seed": 3, "max_new_tokens": 5}}
    single = [h.post("/generate", json=kw | {"text": p}).json() for p in PROMPTS[:2]]
    batch = h.post("/generate", json=kw | {"text": PROMPTS[:2]}).json()
    assert [o["output_ids"] for o in batch] == [o["output_ids"] for s in single for o in s]


def test_tokenize_detokenize_round_trip(srv):
  with srv.http() as h:
    text = PROMPTS[2]
    r = h.post("/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == TOK.encode(text) and r["count"] == len(r["tokens"]) and r["token_strs"] is None
    assert r["max_model_len"] == CFG.max_seq_len
    assert h.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    r = h.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()  # vLLM: BOS by default
    assert r["tokens"] == [TOK.bos_id] + TOK.encode(text) and r["token_strs"][1] == "h"
    assert h.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = h.post("/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == ChatTemplate(None, TOK).encode(messages)  # what /v1/chat/completions would run
    prompt = h.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert prompt == "system: Be brief.\nuser: Hi\nassistant:"
    r = h.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert TOK.decode(r["tokens"]) == "system: Be brief.\nuser: Hi\n"
    # What lm-eval's check_remote_tokenizer_support asks before it uses the server as its tokenizer.
    r = h.get("/tokenizer_info").json()
    assert "eos_token" in r and r["chat_template"] == ChatTemplate(None, TOK).source
    assert r["model_max_length"] == CFG.max_seq_len
    assert h.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()["tokens"] == TOK.encode(
      "test"
    )


BAD = [
  ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
  ("/v1/completions", {"prompt": ["a", [97]], "echo": True}, "prompt"),
  ("/v1/completions", {"prompt": "a", "echo": 1}, "echo"),
  ("/v1/completions", {"prompt": "a" * 129, "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt"),
  ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
  ("/generate", {"text": "a", "logprob_start_len": -2}, "logprob_start_len"),
  ("/generate", {"input_ids": [[1], []]}, "input_ids[1]"),
  ("/generate", {"text": ["a", 1]}, "text"),
  ("/generate", {"text": "a", "return_prompt_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
  ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt"),
  ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
  ("/tokenize", {"prompt": "a", "tools": []}, "tools"),
  ("/detokenize", {"tokens": [1, 999]}, "tokens"),
  ("/detokenize", {}, "tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p}-{k}" for p, _, k in BAD])
def test_bad_requests_name_the_field(srv, path, body, param):
  with srv.http() as h:
    r = h.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert h.get("/health").status_code == 200
