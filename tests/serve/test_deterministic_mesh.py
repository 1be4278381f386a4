"""Deterministic serving on a mesh (serve.deterministic with tp / dp > 1; jaxllm.parallel.invariant_tp):
the 64 requests of test_deterministic give the same bits on the tp=2 serving mesh whatever the batch,
chunking, cache or steps per call, and the learner's log-prob pass on that mesh gives the sampler's
log-probs bit for bit. Under the auto-sharded jit the same tiled model gave 6 of the 64 requests other
bits with chunk size 64 and 8 with one decode step per call; per device in shard_map, none.
(dp=2 x tp=2 is marked slow.)"""

import dataclasses

import jax
import numpy as np
import pytest
from test_deterministic import (
  BASE,
  CFG,
  NEW,
  N,
  _free_compiled_programs,  # noqa: F401 (autouse here too)
  prompts,
  run,
)
from test_serve import params_of

from jaxllm.config import Config, ConfigError, MeshConfig, ModelConfig
from jaxllm.model.params import model_def
from jaxllm.parallel import build_mesh, param_shardings
from jaxllm.rl.learner import token_logps
from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams

TP2, DP2_TP2 = MeshConfig(tp=2), MeshConfig(dp=2, tp=2)


@pytest.fixture(scope="module")
def reference():
  out, eng = run(BASE, mc=TP2)
  assert eng.params["layers"]["wq"].sharding.spec[2] is not None  # the heads really are split
  return out


def test_tp2_alone_equals_batched(reference):
  order = list(range(0, N, 4))  # 16 requests, each alone
  alone, _ = run(BASE, order=order, one_by_one=True, mc=TP2)
  assert alone == {i: reference[i] for i in order}


@pytest.mark.parametrize(
  "name, change",
  [
    ("chunk 64", dict(chunk_size=64)),
    ("one step per call", dict(decode_steps=1)),
    ("cache off", dict(radix=False)),
    ("chunk 1024", dict(chunk_size=1024)),
    ("overlap off", dict(overlap=False)),
    ("preemption", dict(max_pages=10, decode_reserve=0.0, chunk_size=64)),
  ],
)
def test_tp2_scheduling_does_not_change_the_bits(reference, name, change):
  got, eng = run(dataclasses.replace(BASE, **change), order=list(range(N))[::-1], mc=TP2)
  assert got == reference, name
  if name == "preemption":
    assert eng.sched.num_preemptions > 0


@pytest.mark.slow
def test_dp2_tp2_is_batch_invariant_too():
  ref, eng = run(BASE, mc=DP2_TP2)
  assert eng.rows == 2
  got, _ = run(dataclasses.replace(BASE, decode_steps=1, chunk_size=64), order=list(range(N))[::-1], mc=DP2_TP2)
  assert got == ref


def test_tp2_learner_recomputes_the_sampler_logprobs_bit_for_bit():
  """The engine's processed log-probs at temperature 0.7 on tp=2 and the learner's token_logps on the
  same mesh (the RL learner's proximal / behaviour pass): bit for bit."""
  mesh, plan = build_mesh(TP2, jax.devices()[:2])
  eng = Engine(CFG, params_of(CFG), BASE, mesh=mesh, plan=plan)
  ps = prompts()[:8]
  kw = dict(max_tokens=NEW, temperature=0.7, logprobs=True, logprobs_mode="processed")
  sps = [SamplingParams(seed=i, **kw) for i in range(8)]
  results = eng.generate(ps, sps)
  mdef = model_def(dataclasses.replace(CFG, batch_invariant=True))
  inputs, targets = np.zeros((8, 128), np.int32), np.zeros((8, 128), np.int32)
  for i, (p, r) in enumerate(zip(ps, results)):
    seq = p + r.output
    inputs[i, : len(seq) - 1], targets[i, : len(seq) - 1] = seq[:-1], seq[1:]
  sharded = jax.device_put(params_of(CFG), param_shardings(mdef, mesh, plan))
  batch = {"inputs": inputs, "targets": targets}
  learner = np.asarray(token_logps(mdef, sharded, batch, None, 0.7, mesh, plan))
  for i, (p, r) in enumerate(zip(ps, results)):
    got = learner[i, len(p) - 1 : len(p) - 1 + NEW]
    assert got.view(np.int32).tolist() == np.asarray(r.logprobs, np.float32).view(np.int32).tolist(), i


def test_mesh_checks():
  small = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, batch_invariant=True)
  with pytest.raises(ConfigError, match="n_kv_heads=2 must be divisible by mesh.tp=4"):
    Config(model=small, mesh=MeshConfig(tp=4))
  with pytest.raises(ConfigError, match=r"mesh.pp=2"):
    Config(model=small, mesh=MeshConfig(pp=2, microbatches=2))
  mesh, plan = build_mesh(MeshConfig(tp=4), jax.devices()[:4])
  with pytest.raises(ConfigError, match="n_kv_heads"):
    Engine(CFG, params_of(CFG), BASE, mesh=mesh, plan=plan)
