"""Overlap scheduling (serve.overlap): the next decode is launched while the previous one runs, fed
its sampled tokens on the device, and stops are seen one step late. Nothing a user sees may change:
greedy output equals full-forward decoding, seeded samples equal the non-overlapped engine's token for
token, stops inside a chained step truncate as before, aborts and weight swaps mid-flight leak no
page. Each test also checks that chaining really happened (Engine.chained), so none passes vacuously."""

import pytest
from test_serve import DENSE, PINNED, full_forward_greedy, params_of, shared_prefix_prompts

from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams

MAX_TOKENS = (20, 7, 13, 1, 9, 16)


@pytest.mark.parametrize("steps", [1, 4])
def test_overlap_greedy_equals_full_forward_and_stops_one_step_late(steps):
  prompts = shared_prefix_prompts(6, seed=21)
  want = full_forward_greedy(DENSE, prompts, max(MAX_TOKENS))
  sps = [SamplingParams(max_tokens=m) for m in MAX_TOKENS]
  sps[5] = SamplingParams(max_tokens=16, stop_token_ids=(want[5][10],))  # a stop inside a chained step
  eng = Engine(DENSE, params_of(DENSE), **PINNED, decode_steps=steps, overlap=True)
  got = eng.generate(prompts, sps)
  first = want[5][: want[5].index(want[5][10]) + 1]
  assert [r.output for r in got[:5]] == [w[:m] for w, m in zip(want[:5], MAX_TOKENS)]
  assert got[5].output == first and got[5].finish_reason == "stop"
  assert eng.chained > 0, "no decode step was launched behind another"
  eng.sched.check()
  assert eng.idle and eng.sched.tree.protected == 0
  # The dropped step wrote K/V past the stop, in released pages; a request reusing the cached
  # prefix still decodes exactly.
  again = eng.generate([prompts[5] + got[5].output], SamplingParams(max_tokens=5))[0]
  assert again.cache_hit > 0 and again.output == full_forward_greedy(DENSE, [prompts[5] + got[5].output], 5)[0]


def test_overlap_seeded_sampling_equals_plain_loop():
  """Counters and min_tokens of a chained step count the tokens still in flight."""
  prompts = shared_prefix_prompts(4, seed=3)
  sps = [
    SamplingParams(
      max_tokens=14, temperature=1.0, top_p=0.9, seed=s, min_tokens=6 if s == 1 else 0, stop_token_ids=(5, 7, 11)
    )
    for s in range(4)
  ]
  outs = {}
  for overlap in (False, True):
    eng = Engine(DENSE, params_of(DENSE), **PINNED, decode_steps=3, overlap=overlap)
    outs[overlap] = [(r.output, r.finish_reason) for r in eng.generate(prompts, sps)]
    assert (eng.chained > 0) == overlap
  assert outs[True] == outs[False]


def test_abort_and_weight_swap_while_a_step_is_in_flight():
  prompts = shared_prefix_prompts(5, seed=6)
  eng = Engine(DENSE, params_of(DENSE), **PINNED, decode_steps=2)
  reqs = [eng.add_request(p, SamplingParams(max_tokens=24)) for p in prompts]
  while eng.chained == 0:
    eng.step()
  assert eng._inflight is not None and eng.abort(reqs[0])
  eng.step()  # collects the launch that still held reqs[0]
  assert reqs[0].finish_reason == "abort"
  eng.sched.check()
  n = len(reqs[1].output)
  eng.set_weights(params_of(DENSE), 1)  # same weights, new version: the in-flight step is committed
  assert eng._inflight is None and len(reqs[1].output) >= n and not eng.sched.running
  eng.run()
  want = full_forward_greedy(DENSE, prompts[1:], 24)
  assert [r.output for r in reqs[1:]] == want
  eng.sched.check()
  assert eng.idle and eng.sched.tree.protected == 0


def penalised_greedy_reference(cfg, prompt, sp, n):
  """Full forward every step, penalties applied on the host (test_sampling.ref_process)."""
  import jax
  import numpy as np
  from test_sampling import ref_process

  from jaxllm.model.params import model_def

  logits_of = jax.jit(lambda p, toks: model_def(cfg).bind(p)(toks).logits[0])
  seq = list(prompt)
  for _ in range(n):
    x = np.asarray(logits_of(params_of(cfg), np.asarray([seq + [0] * (cfg.max_seq_len - len(seq))], np.int32)))
    seq.append(int(np.argmax(ref_process(x[len(seq) - 1], sp, prompt, seq[len(prompt) :]))))
  return seq[len(prompt) :]


def test_penalised_rows_chain_and_match_reference():
  """Penalty counts live on device and move on by the device's own tokens, so a batch with penalised
  rows still chains (overlap), and every layout -- overlap or not, 1 or 3 steps per call, a store of
  2 slots reused by finished requests -- gives the same tokens, the greedy ones those of a host
  reference."""
  prompts = shared_prefix_prompts(6, seed=8)
  sps = [
    SamplingParams(max_tokens=18, presence_penalty=1.5),
    SamplingParams(max_tokens=15, frequency_penalty=0.9, repetition_penalty=1.3),
    SamplingParams(max_tokens=17),
    SamplingParams(max_tokens=16, temperature=1.0, seed=4, frequency_penalty=2, min_tokens=5, stop_token_ids=(3,)),
    SamplingParams(max_tokens=14, repetition_penalty=0.7, logit_bias={5: 3.0}),
    SamplingParams(max_tokens=12, temperature=0.8, seed=9, presence_penalty=-1),
  ]
  outs = {}
  for overlap, steps, running in ((False, 1, 32), (True, 1, 32), (True, 3, 32), (False, 3, 2)):
    layout = PINNED | dict(max_running=running, min_seqs=min(running, 32))
    eng = Engine(DENSE, params_of(DENSE), **layout, decode_steps=steps, overlap=overlap)
    outs[overlap, steps, running] = [r.output for r in eng.generate(prompts, sps)]
    assert (eng.chained > 0) == overlap, (overlap, steps)
    eng.sched.check()
  first = outs[False, 1, 32]
  assert all(o == first for o in outs.values()), outs
  for i in (0, 1, 4):
    assert first[i] == penalised_greedy_reference(DENSE, prompts[i], sps[i], sps[i].max_tokens), i
