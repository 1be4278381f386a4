"""Deterministic serving (serve.deterministic / model.batch_invariant, jaxllm.model.invariant): a
request's tokens, its log-probs and its top-20 alternatives are the same bits whatever else is in the
batch, however its prompt was chunked, whether its prefix came from the radix cache, with or without
overlap, and after a preemption; and the learner's forward gives the sampler's log-probs bit for bit.
Bits, not tolerances: float32 values are compared through their integer views."""

import dataclasses

import jax
import numpy as np
import pytest
from test_serve import params_of

from jaxllm.config import ConfigError, ModelConfig, ServeConfig
from jaxllm.model.params import model_def
from jaxllm.parallel import build_mesh
from jaxllm.rl.learner import token_logps
from jaxllm.serve import steps
from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams

CFG = ModelConfig(
  vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=160, init_std=0.1
)
BASE = ServeConfig(deterministic=True, page_size=16, num_pages=512, max_running=32)
N, NEW = 64, 8


def prompts():
  """64 prompts of 5..100 tokens, a third sharing a 40-token prefix (radix hits)."""
  rng = np.random.default_rng(0)
  shared = list(rng.integers(0, 256, 40))
  out = []
  for i in range(N):
    tail = list(rng.integers(0, 256, int(rng.integers(5, 60))))
    out.append(shared + tail if i % 3 == 0 else tail + list(rng.integers(0, 256, int(rng.integers(0, 40)))))
  return out


def params(i):
  """Half greedy, half sampled (seeded; temperature, top-p), all with log-probs and top-20."""
  kw = dict(max_tokens=NEW, logprobs=True, top_logprobs=20, ignore_eos=True)
  if i % 2:
    return SamplingParams(temperature=0.8, top_p=0.9, seed=i, **kw)
  return SamplingParams(temperature=0.0, **kw)


def bits(r):
  """A request's output as bits: tokens, log-prob and top-20 (ids, log-prob) integer views."""
  top = [[(i, np.float32(lp).view(np.int32).item()) for i, lp in step] for step in r.top_logprobs]
  return r.output, np.asarray(r.logprobs, np.float32).view(np.int32).tolist(), top


def run(serve, order=None, one_by_one=False, mc=None):
  """{i: bits} of the requests in `order` (default all), batched or one at a time; on one device or
  on the mesh of MeshConfig `mc`."""
  mesh, plan = build_mesh(mc, jax.devices()[: mc.num_devices]) if mc is not None else (None, None)
  eng = Engine(CFG, params_of(CFG), serve, mesh=mesh, plan=plan)
  order = list(range(N)) if order is None else order
  ps = prompts()
  groups = [[i] for i in order] if one_by_one else [order]
  out = {}
  for group in groups:
    reqs = [eng.add_request(ps[i], params(i)) for i in group]
    eng.run()
    out.update({i: bits(r) for i, r in zip(group, reqs)})
  return out, eng


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
  """The tiled programs are large: release them after this module (the suite runs in one process)."""
  yield
  steps._STEPS.clear()
  jax.clear_caches()


@pytest.fixture(scope="module")
def reference():
  return run(BASE)[0]


def test_alone_equals_batched_with_31_others(reference):
  alone, _ = run(BASE, one_by_one=True)
  assert alone == reference


@pytest.mark.parametrize(
  "name, change",
  [
    ("cache off", dict(radix=False)),
    ("chunk 64", dict(chunk_size=64)),
    ("chunk 1024", dict(chunk_size=1024)),
    ("overlap off", dict(overlap=False)),
    ("one step per call", dict(decode_steps=1)),
  ],
)
def test_scheduling_does_not_change_the_bits(reference, name, change):
  got, _ = run(dataclasses.replace(BASE, **change), order=list(range(N))[::-1])  # reversed: other neighbours
  assert got == reference, name


def test_preemption_does_not_change_the_bits(reference):
  tight = dataclasses.replace(BASE, max_pages=10, decode_reserve=0.0, chunk_size=64)
  got, eng = run(tight)
  assert eng.sched.num_preemptions > 0
  assert got == reference


def test_the_learner_recomputes_the_sampler_logprobs_bit_for_bit():
  """processed log-probs (the distribution drawn from, as RL samples) at temperature 0.7 and the
  learner's token_logps at 0.7 on the same tokens; and the raw ones at temperature 1."""
  eng = Engine(CFG, params_of(CFG), BASE)
  ps = prompts()[:12]
  sps = [
    SamplingParams(max_tokens=NEW, temperature=0.7, seed=i, logprobs=True, logprobs_mode="processed")
    for i in range(len(ps))
  ]
  results = eng.generate(ps, sps)
  mdef = model_def(dataclasses.replace(CFG, batch_invariant=True))
  T = 128
  inputs, targets = np.zeros((len(ps), T), np.int32), np.zeros((len(ps), T), np.int32)
  for i, (p, r) in enumerate(zip(ps, results)):
    seq = p + r.output
    inputs[i, : len(seq) - 1], targets[i, : len(seq) - 1] = seq[:-1], seq[1:]
  learner = np.asarray(token_logps(mdef, params_of(CFG), {"inputs": inputs, "targets": targets}, temperature=0.7))
  for i, (p, r) in enumerate(zip(ps, results)):
    got = learner[i, len(p) - 1 : len(p) - 1 + NEW]
    assert got.view(np.int32).tolist() == np.asarray(r.logprobs, np.float32).view(np.int32).tolist(), i


def test_checks():
  with pytest.raises(ValueError, match="page_size to be a multiple of 16"):
    Engine(CFG, params_of(CFG), dataclasses.replace(BASE, page_size=8))
  with pytest.raises(ConfigError, match="dense model"):
    ModelConfig(n_experts=4, n_experts_per_tok=2, moe_d_ff=64, batch_invariant=True)


def test_learner_rows_keep_their_bits_in_any_batch_shape():
  """The learner's log-probs of a row's first positions alike whatever the batch shape. 8 rows (one
  tile exactly, [1, 8]) once gave other bits: XLA inlined the loop of one known trip and fused RoPE
  into the output write differently (jaxllm.model.invariant.tiled)."""
  mdef = model_def(dataclasses.replace(CFG, batch_invariant=True))
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 256, (16, 64)).astype(np.int32), rng.integers(0, 256, (16, 64)).astype(np.int32)

  def logps(B, T):
    return np.asarray(token_logps(mdef, params_of(CFG), {"inputs": x[:B, :T], "targets": y[:B, :T]})).view(np.int32)

  full = logps(16, 64)
  for B, T in [(1, 8), (2, 4), (8, 1), (1, 1), (3, 8), (1, 16), (2, 48)]:
    assert (logps(B, T) == full[:B, :T]).all(), (B, T)
