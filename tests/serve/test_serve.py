"""Serving engine end to end on the tiny model: greedy output equals full-forward argmax decoding
(cache on/off, chunked/unchunked prefill, every policy, preemption, batch 1..32, dense and MoE),
sampling, stop conditions, no recompiles after warm-up, no leaked pages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.model.params import init_params, model_def
from jaxllm.serve import steps
from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams, filter_logits

DENSE = ModelConfig(
  vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64, init_std=0.1
)  # larger init: peaked logits, no argmax near-ties
MOE = ModelConfig(
  vocab_size=128,
  d_model=64,
  n_layers=2,
  n_heads=4,
  n_kv_heads=1,
  d_ff=128,
  n_experts=4,
  n_experts_per_tok=2,
  moe_d_ff=64,
  shared_expert_d_ff=64,
  shared_expert_gate=True,
  max_seq_len=64,
  init_std=0.1,
)
GEN = 6
# One bucket per dimension (32 sequences, 64 tokens, 8 pages): each model compiles 2 steps in all.
PINNED = dict(page_size=8, num_pages=160, max_running=32, min_seqs=32, min_tokens=64)


@functools.lru_cache(maxsize=None)
def params_of(cfg):
  return init_params(cfg, 0)


@functools.lru_cache(maxsize=None)
def forward_fn(cfg):
  mdef = model_def(cfg)
  return jax.jit(lambda p, toks: jnp.argmax(mdef.bind(p)(toks).logits, -1))


def full_forward_greedy(cfg, prompts, n, params=None):
  """Reference: recompute the whole sequence every step, no cache; rows padded to a fixed
  [32, max_seq_len] so one compile serves every test (causal: padding after a row is invisible)."""
  seqs = [list(p) for p in prompts]
  for _ in range(n):
    arr = np.zeros((32, cfg.max_seq_len), np.int32)
    for i, s in enumerate(seqs):
      arr[i, : len(s)] = s
    nxt = np.asarray(forward_fn(cfg)(params_of(cfg) if params is None else params, arr))
    for i, s in enumerate(seqs):
      s.append(int(nxt[i, len(s) - 1]))
  return [s[len(p) :] for s, p in zip(seqs, prompts)]


def shared_prefix_prompts(n, seed=0):
  """Groups of prompts sharing a system prompt (some identical, some prefixes of others)."""
  rng = np.random.default_rng(seed)
  systems = [list(rng.integers(0, 128, rng.integers(9, 24))) for _ in range(3)]
  out = []
  for i in range(n):
    tail = list(rng.integers(0, 128, rng.integers(1, 12))) if i % 4 else []
    out.append(systems[i % 3] + tail)
  return out


SETTINGS = {
  "no-cache": dict(radix=False, policy="fcfs", chunk_size=32),
  "fcfs": dict(policy="fcfs", chunk_size=32),
  "lpm-chunked": dict(policy="lpm", chunk_size=8),
  "dfs-weight-chunked": dict(policy="dfs-weight", chunk_size=8),
  # A tight pool: admission reserving every request's decode pages evicts but never preempts;
  # reserving none (SGLang's optimistic new_token_ratio at its floor) forces preemptions.
  "mem-limit": dict(policy="dfs-weight", chunk_size=16, max_pages=14),
  "preempt": dict(policy="lpm", chunk_size=16, max_pages=14, decode_reserve=0.0),
}


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_greedy_equals_full_forward(cfg):
  params = params_of(cfg)
  traced = {key: f.traces for key, f in steps._STEPS.items()}  # step functions are shared across tests
  for batch in (1, 5, 32):
    prompts = shared_prefix_prompts(batch, seed=batch)
    want = full_forward_greedy(cfg, prompts, GEN)
    for name, kw in SETTINGS.items():
      eng = Engine(cfg, params, **PINNED, **kw)
      got = eng.generate(prompts, SamplingParams(max_tokens=GEN))
      assert [r.output for r in got] == want, f"{name}, batch {batch}"
      eng.sched.check()
      assert eng.idle and eng.sched.tree.protected == 0
      if batch == 32 and name == "preempt":
        assert eng.sched.num_preemptions > 0
      if name == "mem-limit":
        assert eng.sched.num_preemptions == 0
      if batch > 1 and kw.get("radix", True):
        assert sum(r.cache_hit for r in got) > 0, name
  assert all(f.traces - traced.get(key, 0) <= 1 for key, f in steps._STEPS.items())  # one shape per step function


def test_logprobs_and_weight_version():
  cfg = DENSE
  eng = Engine(cfg, params_of(cfg), **PINNED)
  prompt = shared_prefix_prompts(1)[0]
  r = eng.generate([prompt], SamplingParams(max_tokens=3, logprobs=True))[0]
  logits = model_def(cfg).bind(params_of(cfg))(jnp.asarray([prompt + r.output])).logits[0]
  want = jax.nn.log_softmax(logits, -1)[np.arange(len(prompt) - 1, len(prompt) + 2), r.output]
  np.testing.assert_allclose(r.logprobs, want, rtol=1e-4, atol=1e-5)
  assert eng.generate([prompt], SamplingParams(max_tokens=1))[0].cache_hit > 0
  eng.set_weights(params_of(cfg), version=1)  # new namespace: old KV is not reused
  assert eng.generate([prompt], SamplingParams(max_tokens=1))[0].cache_hit == 0
  eng.sched.check()


def test_seeded_sampling_is_reproducible_across_batches():
  cfg = DENSE
  prompts = shared_prefix_prompts(6, seed=3)
  sp = lambda seed: SamplingParams(max_tokens=GEN, temperature=1.0, top_k=20, top_p=0.9, min_p=0.05, seed=seed)
  eng = Engine(cfg, params_of(cfg), **PINNED)
  alone = eng.generate([prompts[0]], sp(7))[0].output
  mixed = eng.generate(prompts, [sp(7)] + [sp(i) for i in range(5)])
  assert mixed[0].output == alone
  outs = [tuple(eng.generate([prompts[0]], sp(s))[0].output) for s in range(8)]
  assert len(set(outs)) > 1, "different seeds should give different samples"


def test_filter_masks():
  logp = np.log(np.array([[0.5, 0.25, 0.15, 0.1]] * 4, np.float32))
  out = np.asarray(
    filter_logits(
      jnp.asarray(logp), jnp.array([2, 0, 0, 0]), jnp.array([1.0, 0.7, 1.0, 0.5]), jnp.array([0.0, 0.0, 0.4, 0.0])
    )
  )
  keep = np.isfinite(out)
  assert keep.tolist() == [
    [True, True, False, False],  # top-k 2
    [True, True, False, False],  # top-p 0.7: 0.5 + 0.25 reach it
    [True, True, False, False],  # min-p 0.4: p >= 0.2
    [True, False, False, False],
  ]  # top-p 0.5: the top token alone


def test_stop_tokens_and_strings():
  """A stop token ends the request and stays in the token output; a stop string ends it as soon as
  the text contains it, and is cut from the text (OpenAI semantics)."""
  detok = lambda ids: "".join(chr(97 + t % 26) for t in ids)
  cfg = DENSE
  prompt = shared_prefix_prompts(1)[0]
  greedy = full_forward_greedy(cfg, [prompt], GEN)[0]
  eng = Engine(cfg, params_of(cfg), **PINNED, detokenize=detok)
  r = eng.generate(
    [prompt, prompt],
    [
      SamplingParams(max_tokens=GEN, stop_token_ids=(greedy[2],)),
      SamplingParams(max_tokens=GEN, stop=(detok(greedy[1:3]),)),
    ],
  )
  assert r[0].output == greedy[: greedy.index(greedy[2]) + 1] and r[0].finish_reason == "stop"
  assert r[1].output == greedy[:3] and r[1].finish_reason == "stop"
  texts = sorted(q.stream.text for q in eng.finished[-2:])
  assert detok(greedy[:1]) in texts and not any(detok(greedy[1:3]) in t for t in texts)


def test_no_recompiles_after_warmup():
  cfg = DENSE
  eng = Engine(cfg, params_of(cfg), **{**PINNED, "min_seqs": 16}, chunk_size=32)
  eng.warmup()
  before = eng.compiles
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(0, 128, rng.integers(1, 40))) for _ in range(24)]
  eng.generate(prompts[:3], SamplingParams(max_tokens=4))
  eng.generate(prompts, [SamplingParams(max_tokens=int(rng.integers(1, 20))) for _ in prompts])
  assert eng.compiles == before
  eng.sched.check()


def test_request_validation():
  eng = Engine(DENSE, params_of(DENSE), **PINNED)
  with pytest.raises(ValueError, match="max_seq_len"):
    eng.add_request([1] * 60, SamplingParams(max_tokens=10))
  with pytest.raises(ValueError, match="vocab"):
    eng.add_request([500])


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_pallas_engine_equals_reference_engine(dtype):
  """serve.attention=pallas end to end (the TPU kernels in interpret mode on CPU): the same greedy
  tokens as the reference attention, through chunked prefills with cached prefixes, mixed ragged
  steps and decode steps at several bucket sizes. bf16 (slow): pools and activations in bf16."""
  import dataclasses

  cfg = dataclasses.replace(DENSE, dtype=dtype)
  prompts = shared_prefix_prompts(4, seed=3)
  kw = dict(page_size=8, num_pages=64, max_running=8, chunk_size=16, decode_steps=1, min_seqs=1, min_tokens=8)
  want = Engine(cfg, params_of(cfg), **kw).generate(prompts, SamplingParams(max_tokens=4))
  eng = Engine(cfg, params_of(cfg), attention="pallas", **kw)
  got = eng.generate(prompts, SamplingParams(max_tokens=4))
  assert [r.output for r in got] == [r.output for r in want]
  assert eng.compiles >= 3  # ragged and decode steps, more than one bucket
  if dtype == "float32":
    assert [r.output for r in got] == full_forward_greedy(cfg, prompts, 4)
