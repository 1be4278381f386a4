"""Multi-step decode (Engine(decode_steps=n)): n decode steps per device call, tokens committed on
the host afterwards. Greedy output must equal full-forward argmax decoding token for token whatever
n, with max_tokens not a multiple of n, stop tokens and strings hit inside a chunk (the rest of the
chunk discarded, no page leaked), and requests arriving while others are mid-decode."""

import pytest
from test_serve import DENSE, MOE, PINNED, full_forward_greedy, params_of, shared_prefix_prompts

from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams

MAX_TOKENS = (20, 7, 13, 1, 9)  # none a multiple of 8, one finishing at prefill


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_multistep_greedy_equals_full_forward(cfg):
  prompts = shared_prefix_prompts(5, seed=11)
  want = full_forward_greedy(cfg, prompts, max(MAX_TOKENS))
  for steps in (1, 3, 8):
    eng = Engine(cfg, params_of(cfg), **PINNED, chunk_size=16, decode_steps=steps)
    got = eng.generate(prompts, [SamplingParams(max_tokens=m) for m in MAX_TOKENS])
    assert [r.output for r in got] == [w[:m] for w, m in zip(want, MAX_TOKENS)], f"decode_steps={steps}"
    assert all(r.finish_reason == "length" for r in got)
    eng.sched.check()
    assert eng.idle and eng.sched.tree.protected == 0
    assert set(eng._fns) == ({"ragged", "decode"} | ({"multi"} if steps > 1 else set()))  # no tokenizer: no grammar
    compiles = eng.compiles  # the same workload again: every shape is compiled
    eng.set_weights(eng.params, 1)
    eng.generate(prompts, [SamplingParams(max_tokens=m) for m in MAX_TOKENS])
    assert eng.compiles == compiles


def test_stop_mid_chunk_truncates():
  detok = lambda ids: "".join(chr(97 + t % 26) for t in ids)
  cfg = DENSE
  prompts = shared_prefix_prompts(4, seed=2)
  want = full_forward_greedy(cfg, prompts, 16)
  sps = [
    SamplingParams(max_tokens=16, stop_token_ids=(want[0][3],)),  # stop token inside chunk 1
    SamplingParams(max_tokens=16, stop=(detok(want[1][9:11]),)),  # stop string inside chunk 2
    SamplingParams(max_tokens=16, stop_token_ids=(want[2][0],)),  # stop at the prefill token
    SamplingParams(max_tokens=16, logprobs=True),
  ]
  eng = Engine(cfg, params_of(cfg), **PINNED, decode_steps=8, detokenize=detok)
  got = eng.generate(prompts, sps)
  first = lambda seq, tok: seq[: seq.index(tok) + 1]
  assert got[0].output == first(want[0], want[0][3]) and got[0].finish_reason == "stop"
  text = detok(want[1])
  end = text.index(detok(want[1][9:11])) + 2  # the first token whose text completes the stop
  assert got[1].output == want[1][:end] and got[1].finish_reason == "stop"
  assert got[2].output == want[2][:1] and got[2].finish_reason == "stop"
  assert got[3].output == want[3] and len(got[3].logprobs) == 16 and got[3].finish_reason == "length"
  assert len(got[0].token_times) == len(got[0].output)
  eng.sched.check()
  assert eng.idle and eng.sched.tree.protected == 0
  # The discarded tail wrote K/V past the stop; a later request reusing the cached prefix still
  # matches the full forward.
  again = eng.generate([prompts[0] + got[0].output], SamplingParams(max_tokens=6))[0]
  assert again.cache_hit > 0
  assert again.output == full_forward_greedy(cfg, [prompts[0] + got[0].output], 6)[0]


def test_arrivals_while_decoding():
  cfg = DENSE
  prompts = shared_prefix_prompts(9, seed=4)
  want = full_forward_greedy(cfg, prompts, 17)
  eng = Engine(cfg, params_of(cfg), **PINNED, chunk_size=16, decode_steps=8)
  reqs = [eng.add_request(p, SamplingParams(max_tokens=17)) for p in prompts[:3]]
  arrivals = iter(prompts[3:])
  multi_with_new = False
  while not eng.idle or len(reqs) < len(prompts):
    if len(reqs) < len(prompts) and any(len(r.output) >= 2 for r in reqs):
      reqs.append(eng.add_request(next(arrivals), SamplingParams(max_tokens=17)))  # mid-decode arrival
    before = [len(r.output) for r in reqs]
    eng.step()
    grew = [len(r.output) - b for r, b in zip(reqs, before)]
    multi_with_new |= max(grew) > 1 and len(reqs) > 3
  assert multi_with_new, "expected multi-step chunks once the late requests were decoding"
  assert [r.output for r in reqs] == want
  eng.sched.check()


def test_seeded_sampling_independent_of_decode_steps():
  """The n-th token's key is fold_in(seed, n): the same whether it was drawn in a chunk or alone."""
  cfg = DENSE
  prompts = shared_prefix_prompts(3, seed=8)
  sps = [SamplingParams(max_tokens=11, temperature=1.0, top_k=30, top_p=0.95, seed=s) for s in range(3)]
  outs = [
    [r.output for r in Engine(cfg, params_of(cfg), **PINNED, decode_steps=n).generate(prompts, sps)] for n in (1, 4)
  ]
  assert outs[0] == outs[1]


def test_decode_steps_validation():
  with pytest.raises(ValueError, match="decode_steps"):
    Engine(DENSE, params_of(DENSE), **PINNED, decode_steps=0)


@pytest.mark.parametrize("overlap", [False, True])
def test_streaming_request_gets_one_token_per_call(overlap):
  """A multi-step call hands its tokens over at once; while a streaming request runs, the engine
  takes one step per call so its client gets each token as it is produced (serve.stream_multistep
  keeps the bursts). The other request goes back to multi-step once the stream is done."""
  prompts = shared_prefix_prompts(2, seed=5)
  want = full_forward_greedy(DENSE, prompts, 24)
  for bursts in (False, True):
    eng = Engine(DENSE, params_of(DENSE), **PINNED, decode_steps=4, overlap=overlap, stream_multistep=bursts)
    a = eng.add_request(prompts[0], SamplingParams(max_tokens=10), streaming=True)
    b = eng.add_request(prompts[1], SamplingParams(max_tokens=24))
    eng.run()
    assert [a.output, b.output] == [want[0][:10], want[1]]
    one_per_call = len(set(a.token_times)) == len(a.token_times)
    assert one_per_call != bursts
    late = [t for t in b.token_times if t > a.token_times[-1]]  # after the stream finished: bursts again
    assert len(set(late)) < len(late)
