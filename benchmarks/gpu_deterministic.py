"""gpu_check.py section 5: deterministic mode (serve.deterministic / model.batch_invariant) on the
accelerator in bf16. Bits, as tests/serve/test_deterministic.py compares them on CPU, and the cost:

  - 16 requests (half greedy, half seeded-sampled, all with log-probs and top-5) batched, then 4 of
    them alone, then all with one decode step per call and a 64-token prefill chunk: how many give
    the batched run's tokens and log-prob bits;
  - the learner's token_logps at temperature 0.7 against the engine's processed log-probs of 8
    sampled requests: how many match bit for bit;
  - greedy decode tokens/s at batch 8 with the mode off and on (serve's defaults otherwise).

  PYTHONPATH=. python benchmarks/gpu_check.py --sections 5 --out $OUT
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from gpu_report import guarded


def _bits(r):
  top = [[(i, np.float32(lp).view(np.int32).item()) for i, lp in step] for step in r.top_logprobs]
  return r.output, np.asarray(r.logprobs, np.float32).view(np.int32).tolist(), top


def section_deterministic(rep, a, budget):
  from jaxllm.config import MODEL_PRESETS, ServeConfig
  from jaxllm.model.params import init_params, model_def
  from jaxllm.rl.learner import token_logps
  from jaxllm.serve import Engine
  from jaxllm.serve.bench import engine_decode_tokens_per_s
  from jaxllm.serve.sampling import SamplingParams

  cfg = dataclasses.replace(MODEL_PRESETS["tiny"], dtype="bfloat16", max_seq_len=256)
  params = jax.jit(lambda: init_params(cfg, 0))()
  new = 4 if a.smoke else 16
  base = ServeConfig(deterministic=True, page_size=16, num_pages=256, max_running=16)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(0, cfg.vocab_size, int(rng.integers(5, 100)))) for _ in range(16)]

  def sp(i):
    kw = dict(max_tokens=new, logprobs=True, top_logprobs=5, ignore_eos=True)
    return SamplingParams(temperature=0.8, top_p=0.9, seed=i, **kw) if i % 2 else SamplingParams(temperature=0.0, **kw)

  def run(serve, order, one_by_one=False):
    eng = Engine(cfg, params, serve)
    out = {}
    for group in [[i] for i in order] if one_by_one else [order]:
      reqs = [eng.add_request(prompts[i], sp(i)) for i in group]
      eng.run()
      out.update({i: _bits(r) for i, r in zip(group, reqs)})
    return out

  cols = [("case", "case", ""), ("same", "requests with the batched run's bits", ""), ("wall_s", "wall s", ".1f")]
  title = f"bits: tiny bf16, 16 requests, {new} new tokens each"
  ref = {}

  def bits_case(name, serve, order, one_by_one=False):
    t0 = time.perf_counter()
    got = run(serve, order, one_by_one)
    if not ref:  # the first case is the reference (if it failed, the others fail on the lookup)
      ref.update(got)
    same = sum(got[i] == ref[i] for i in got)
    rep.row(title, cols, dict(case=name, same=f"{same} / {len(got)}", wall_s=time.perf_counter() - t0))

  cases = [
    ("batched (reference)", base, list(range(16)), False),
    ("4 of them alone", base, [0, 5, 10, 15], True),
    (
      "reversed, 1 step per call, chunk 64",
      dataclasses.replace(base, decode_steps=1, chunk_size=64),
      list(range(16))[::-1],
      False,
    ),
  ]
  for name, serve, order, alone in cases:
    if budget.ok(rep, 0.9, f"deterministic {name}"):
      guarded(rep, f"deterministic {name}", bits_case, name, serve, order, alone)

  def learner_case():
    eng = Engine(cfg, params, base)
    kw = dict(max_tokens=new, temperature=0.7, logprobs=True, logprobs_mode="processed")
    res = eng.generate(prompts[:8], [SamplingParams(seed=i, **kw) for i in range(8)])
    T = 128
    inputs, targets = np.zeros((8, T), np.int32), np.zeros((8, T), np.int32)
    for i, (p, r) in enumerate(zip(prompts, res)):
      seq = p + r.output
      inputs[i, : len(seq) - 1], targets[i, : len(seq) - 1] = seq[:-1], seq[1:]
    mdef = model_def(dataclasses.replace(cfg, batch_invariant=True))
    lp = np.asarray(token_logps(mdef, params, {"inputs": inputs, "targets": targets}, temperature=0.7))
    same = sum(
      lp[i, len(p) - 1 : len(p) - 1 + new].view(np.int32).tolist()
      == np.asarray(r.logprobs, np.float32).view(np.int32).tolist()
      for i, (p, r) in enumerate(zip(prompts, res))
    )
    rep.row(
      "learner = sampler (processed log-probs, temperature 0.7)",
      [("same", "requests bit-equal", "")],
      dict(same=f"{same} / 8"),
    )
    rep.summary["deterministic learner = sampler"] = f"{same} / 8"

  if budget.ok(rep, 0.92, "deterministic learner = sampler"):
    guarded(rep, "deterministic learner = sampler", learner_case)

  def speed_case():
    rates = {}
    for mode in (False, True):
      eng = Engine(
        cfg, params, ServeConfig(deterministic=mode, page_size=16, num_pages=256, max_running=8, radix=False)
      )
      rates[mode], _ = engine_decode_tokens_per_s(eng, 8, 32, new * 4, reps=1)
    cols = [("off", "off tok/s", ",.0f"), ("on", "on tok/s", ",.0f"), ("ratio", "on/off", ".2f")]
    rep.row(
      "greedy decode, batch 8, tiny bf16",
      cols,
      dict(off=rates[False], on=rates[True], ratio=rates[True] / rates[False]),
    )
    rep.summary["deterministic decode on/off (batch 8)"] = f"{rates[True] / rates[False]:.2f}"

  if budget.ok(rep, 0.95, "deterministic decode speed"):
    guarded(rep, "deterministic decode speed", speed_case)
