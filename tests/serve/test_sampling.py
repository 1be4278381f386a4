"""The batched sampler (jaxllm/serve/sampling.py) against numpy references written here: HF/vLLM
filter order (top-k, top-p over the renormalised top-k survivors, min-p), OpenAI presence/frequency
penalties on generated tokens, HF repetition penalty on prompt + generated tokens, logit_bias,
min_tokens, raw top-20 logprobs, per-request seeds, multi-step (lax.scan + advance) == single steps
rebuilt on the host, neutral and padding rows untouched, validation errors that name the field.
Small shapes: a handful of compiles, seconds on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.serve.sampling import (
  TOP_LOGPROBS,
  SamplingParams,
  advance,
  build_sampling_arrays,
  filter_logits,
  history_bucket,
  init_penalty_state,
  process_logits,
  sample_rows,
  with_random_seed,
)

V = 64
jit_sample = jax.jit(sample_rows)
jit_process = jax.jit(lambda logits, samp: process_logits(logits, init_penalty_state(samp, logits.shape[-1])))
jit_filter = jax.jit(filter_logits)


def logits_of(R, seed=0, scale=2.0, V=V):
  return np.asarray(np.random.default_rng(seed).normal(size=(R, V)) * scale, np.float32)


# ---------------------------------------------------------------------------------------------------
# numpy references


def softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


def ref_keep(x, top_k, top_p, min_p):
  """HF's warper chain on one row of temperature-scaled logits: TopK -> TopP -> MinP."""
  n = len(x)
  order = np.argsort(-x, kind="stable")
  k = n if top_k == 0 else min(top_k, n)
  top = order[:k]
  probs = softmax(x[top])  # renormalised over the top-k survivors
  before = np.cumsum(probs) - probs
  m = k if top_p >= 1 else max(1, int(np.sum(before < top_p)))
  kept = top[:m]
  p = softmax(x[kept])
  kept = kept[p >= min_p * p.max()]
  keep = np.zeros(n, bool)
  keep[kept] = True
  return keep


def ref_process(x, sp, prompt, gen, eos=()):
  """logit_bias, min_tokens ban, repetition (prompt + generated), frequency/presence (generated)."""
  x = np.array(x, np.float64)
  for t, b in sp.logit_bias:
    x[t] += b
  if len(gen) < sp.min_tokens:
    for t in tuple(sp.stop_token_ids) + (() if sp.ignore_eos else tuple(eos)):
      x[t] = -np.inf
  for t in set(prompt) | set(gen):
    x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
  counts = np.bincount(np.asarray(gen, np.int64), minlength=len(x))
  return x - sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0)


def log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize(
  "kwargs, field",
  [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(seed=1.5), "seed"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logit_bias={5: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={i: 1 for i in range(301)}), "logit_bias"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=17, max_tokens=16), "min_tokens"),
    (dict(top_logprobs=21, logprobs=True), "top_logprobs"),
    (dict(top_logprobs=3), "top_logprobs"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids"),
  ],
)
def test_validation_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field) as e:
    SamplingParams(**kwargs)
  assert "must be" in str(e.value)


def test_params_are_frozen_hashable_and_normalised():
  sp = SamplingParams(
    logit_bias={"7": 5, 2: -100},
    stop_token_ids=[3],
    top_logprobs=20,
    logprobs=True,
    presence_penalty=-2,
    frequency_penalty=2,
    repetition_penalty=1.2,
    min_tokens=16,
  )
  assert sp.logit_bias == ((2, -100.0), (7, 5.0)) and sp.stop_token_ids == (3,)
  assert hash(sp) == hash(SamplingParams(**{**sp.__dict__, "logit_bias": {2: -100, 7: 5}}))
  assert sp.uses_penalties and not SamplingParams().uses_penalties
  with pytest.raises(Exception):
    sp.seed = 1
  with pytest.raises(ValueError, match="logit_bias"):
    SamplingParams(logit_bias={64: 1}).check_vocab(64)
  SamplingParams(logit_bias={63: 1}).check_vocab(64)
  assert [history_bucket(n) for n in (0, 1, 16, 17, 100)] == [0, 16, 16, 32, 128]


# ---------------------------------------------------------------------------------------------------
# filtering and sampling


def test_filter_order_matches_hf_reference():
  # top-p over the renormalised top-2 ([0.57, 0.43]): 0.5 is reached by the top token alone; over the
  # whole distribution it would take two.
  logp = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], np.float32))
  keep = np.isfinite(np.asarray(jit_filter(logp, jnp.array([2]), jnp.array([0.5]), jnp.array([0.0]))))
  assert keep.tolist() == [[True, False, False, False]]
  rng = np.random.default_rng(1)
  settings = [
    (0, 1.0, 0.0),
    (5, 1.0, 0.0),
    (0, 0.7, 0.0),
    (8, 0.6, 0.0),
    (0, 1.0, 0.3),
    (12, 0.9, 0.05),
    (3, 0.3, 0.5),
    (1, 0.5, 0.9),
    (100, 0.95, 0.01),
    (20, 1.0, 1.0),
    (6, 0.99, 0.2),
    (0, 0.2, 0.0),
  ]
  x = np.asarray(rng.normal(size=(len(settings), V)) * 2, np.float32)
  k, p, m = (np.asarray(c) for c in zip(*settings))
  out = np.asarray(jit_filter(x, jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32), jnp.asarray(m, jnp.float32)))
  for i, (kk, pp, mm) in enumerate(settings):
    want = ref_keep(x[i], kk, pp, mm)
    np.testing.assert_array_equal(np.isfinite(out[i]), want, err_msg=f"row {i}: {settings[i]}")
    assert want[np.argmax(x[i])]  # the argmax always survives
  np.testing.assert_array_equal(out[np.isfinite(out)], x[np.isfinite(out)])


def test_sampled_frequencies_follow_the_filtered_distribution():
  R, Vs = 4096, 16
  x = logits_of(1, seed=2, scale=1.0, V=Vs)[0]
  sp = SamplingParams(temperature=0.7, top_k=8, top_p=0.8, min_p=0.05, seed=11)
  samp = build_sampling_arrays([sp] * R, [((), [0] * c) for c in range(R)], R)  # counters 0..R-1
  toks = np.asarray(jit_sample(np.tile(x, (R, 1)), samp)[0])
  keep = ref_keep(x / 0.7, 8, 0.8, 0.05)
  assert keep[toks].all(), "a filtered-out token was sampled"
  want = np.where(keep, np.exp(x / 0.7 - (x / 0.7).max()), 0)
  want /= want.sum()
  got = np.bincount(toks, minlength=Vs) / R
  assert 0.5 * np.abs(got - want).sum() < 0.04, (got, want)


# ---------------------------------------------------------------------------------------------------
# penalties, logit_bias, min_tokens


def test_penalties_bias_and_min_tokens_match_reference():
  rng = np.random.default_rng(3)
  sps = [
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=0.7),
    SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.8, frequency_penalty=2),
    SamplingParams(logit_bias={3: 100, 4: -100, 5: 2.5}),
    SamplingParams(min_tokens=5, stop_token_ids=(1, 2), max_tokens=20),
    SamplingParams(min_tokens=5, stop_token_ids=(1,), ignore_eos=True, max_tokens=20),
    SamplingParams(min_tokens=2, stop_token_ids=(1,)),  # reached: nothing banned
    SamplingParams(),
  ]
  hist = [
    (list(rng.integers(0, 16, size=int(rng.integers(1, 12)))), list(rng.integers(8, 24, size=int(rng.integers(0, 10)))))
    for _ in sps
  ]
  hist[6] = hist[7] = (hist[6][0], [9, 9, 10])
  hist[8] = (hist[8][0], [9, 9, 10])
  R = 16
  x = logits_of(R, seed=4)
  samp = build_sampling_arrays(sps, hist, R, eos_ids=(7,))
  got = np.asarray(jit_process(x, samp))
  for i, sp in enumerate(sps):
    want = ref_process(x[i], sp, *hist[i], eos=(7,))
    np.testing.assert_array_equal(np.isinf(got[i]), np.isinf(want), err_msg=f"row {i}")
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[i][fin], want[fin], rtol=1e-6, atol=1e-5, err_msg=f"row {i}")
  np.testing.assert_array_equal(got[len(sps) :], x[len(sps) :])  # padding rows untouched
  np.testing.assert_array_equal(got[len(sps) - 1], x[len(sps) - 1])
  # Presence/frequency only see generated tokens; repetition also the prompt, by sign.
  p_only = [t for t in set(hist[0][0]) if t not in hist[0][1]]
  np.testing.assert_array_equal(got[0, p_only], x[0, p_only])
  assert np.isinf(got[6, [1, 2, 7]]).all() and np.isinf(got[7, 1]) and np.isfinite(got[7, 7])


def test_bias_forces_and_bans_tokens_when_sampling():
  R = 8
  x = logits_of(R, seed=5)
  top = np.argmax(x, -1)
  sps = [SamplingParams(temperature=1.0, seed=i, logit_bias={17: 100}) for i in range(4)]
  sps += [SamplingParams(temperature=0.0, logit_bias={int(top[i]): -100}) for i in range(4, 8)]
  samp = build_sampling_arrays(sps, [((), [])] * R, R)
  toks, logps, _, _ = (np.asarray(a) for a in jit_sample(x, samp))
  assert (toks[:4] == 17).all()
  assert (toks[4:] != top[4:]).all()
  np.testing.assert_array_equal(toks[4:], np.argmax(np.where(np.eye(V)[top] > 0, -np.inf, x), -1)[4:])
  np.testing.assert_allclose(logps, log_softmax(x)[np.arange(R), toks], rtol=1e-5, atol=1e-6)  # raw


def test_min_tokens_bans_stop_ids_until_reached():
  R = 4
  x = np.zeros((R, V), np.float32)
  x[:, 5] = 20.0  # the stop token dominates
  sp = SamplingParams(temperature=1.0, seed=3, min_tokens=3, stop_token_ids=(5,), max_tokens=8)
  for gen in ([], [1], [1, 2], [1, 2, 3]):
    samp = build_sampling_arrays([sp, dataclass_greedy(sp)], [((0,), gen)] * 2, R)
    toks = np.asarray(jit_sample(x, samp)[0])
    reached = len(gen) >= 3
    assert (toks[:2] == 5).all() == reached and ((toks[:2] == 5).any() == reached), (gen, toks)


def dataclass_greedy(sp):
  return SamplingParams(**{**sp.__dict__, "temperature": 0.0})


# ---------------------------------------------------------------------------------------------------
# logprobs


def test_top_logprobs_are_the_raw_top_20():
  R = 4
  x = logits_of(R, seed=6)
  sps = [
    SamplingParams(logprobs=True, top_logprobs=20, temperature=0.5, seed=1, presence_penalty=2, logit_bias={0: 50}),
    SamplingParams(logprobs=True, top_logprobs=3),
  ]
  samp = build_sampling_arrays(sps, [((1, 2), [3])] * 2, R)
  toks, lp, ids, tlp = (np.asarray(a) for a in jit_sample(x, samp))
  ref = log_softmax(x)
  want_ids = np.argsort(-ref, -1, kind="stable")[:, :TOP_LOGPROBS]
  assert ids.shape == (R, 20) and tlp.shape == (R, 20) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(tlp, np.take_along_axis(ref, want_ids, -1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lp, ref[np.arange(R), toks], rtol=1e-5, atol=1e-6)
  assert toks[0] == 0  # biased +50: sampled, but its logprob stays raw
  # A vocab under 20: the tail is padded with id 0 / -inf. No row asking: skipped (all -inf).
  small = logits_of(2, seed=7, V=8)
  s = build_sampling_arrays([sps[1]], [((), [])], 2)
  ids, tlp = (np.asarray(a) for a in jax.jit(sample_rows)(small, s)[2:])
  np.testing.assert_array_equal(ids[:, :8], np.argsort(-small, -1, kind="stable"))
  assert np.isneginf(tlp[:, 8:]).all() and (ids[:, 8:] == 0).all()
  s = build_sampling_arrays([SamplingParams(logprobs=True)], [((), [])], 2)
  assert np.isneginf(np.asarray(jax.jit(sample_rows)(small, s)[3])).all()


def test_processed_logprobs_are_of_the_distribution_sampled_from():
  """logprobs_mode="processed": the sampled token's log-prob after bias, penalties, temperature and
  the filters, renormalised (what an RL learner divides by); greedy rows and "raw" rows unchanged."""
  R = 5
  x = logits_of(R, seed=11)
  x[3] = x[0]  # row 3: row 0 in raw mode
  sps = [
    SamplingParams(logprobs=True, logprobs_mode="processed", temperature=0.7, seed=1),
    SamplingParams(
      logprobs=True,
      logprobs_mode="processed",
      temperature=1.3,
      seed=2,
      top_k=5,
      top_p=0.9,
      presence_penalty=1.0,
      logit_bias={3: 2.0},
    ),
    SamplingParams(logprobs=True, logprobs_mode="processed"),  # greedy: raw
    SamplingParams(logprobs=True, temperature=0.7, seed=1),
  ]  # raw mode
  hist = [((1, 2), [3])] * 4
  samp = build_sampling_arrays(sps, hist, R)
  toks, lp = (np.asarray(a) for a in jit_sample(x, samp)[:2])
  proc = np.asarray(jit_process(x, samp))  # bias and penalties applied
  raw = log_softmax(x)
  want0 = log_softmax(proc[0] / 0.7)[toks[0]]
  keep = ref_keep(proc[1] / 1.3, 5, 0.9, 0.0)
  want1 = log_softmax(np.where(keep, proc[1] / 1.3, -np.inf))[toks[1]]
  np.testing.assert_allclose(lp[:4], [want0, want1, raw[2, toks[2]], raw[3, toks[3]]], rtol=1e-5, atol=1e-6)
  assert toks[0] == toks[3] and lp[0] != lp[3]  # same seed, same draw; different log-prob reported
  with pytest.raises(ValueError, match="logprobs_mode"):
    SamplingParams(logprobs_mode="tempered")


# ---------------------------------------------------------------------------------------------------
# seeds, neutral rows, padding


def test_seeds():
  R = 8
  x = logits_of(R, seed=8, scale=0.3)  # flat: different keys pick different tokens
  sp = lambda seed: SamplingParams(temperature=1.0, seed=seed, top_p=0.95)
  for counter in range(3):
    gen = [0] * counter
    a = build_sampling_arrays([sp(7)], [((), gen)], R)
    b = build_sampling_arrays([sp(1), SamplingParams(presence_penalty=1), sp(7)], [((), gen)] * 3, R)
    xb = x.copy()
    xb[2] = x[0]
    assert int(jit_sample(x, a)[0][0]) == int(jit_sample(xb, b)[0][2])  # same seed, same token
  many = build_sampling_arrays([sp(s) for s in range(R)], [((), [])] * R, R)
  assert len(set(np.asarray(jit_sample(np.tile(x[:1], (R, 1)), many)[0]).tolist())) > 1
  seeds = {with_random_seed(SamplingParams(temperature=1.0)).seed for _ in range(8)}
  assert len(seeds) == 8 and all(0 <= s < 2**32 for s in seeds)
  assert with_random_seed(sp(5)).seed == 5
  with pytest.raises(ValueError, match="with_random_seed"):
    build_sampling_arrays([SamplingParams(temperature=1.0)], [((), [])], 2)
  build_sampling_arrays([SamplingParams()], [((), [])], 2)  # greedy needs no seed


def test_greedy_and_padding_rows_are_unaffected():
  R = 8
  x = logits_of(R, seed=9)
  greedy = SamplingParams(logprobs=True)
  others = [
    SamplingParams(temperature=1.3, seed=2, top_k=3, presence_penalty=2, repetition_penalty=1.5),
    SamplingParams(logit_bias={int(np.argmax(x[1])): -100}, min_tokens=4, stop_token_ids=(1, 2, 3)),
    SamplingParams(temperature=0.5, seed=4, frequency_penalty=-2, top_logprobs=20, logprobs=True),
  ]
  hist = [((1, 2, 3), [4, 5])] * 4
  mixed = [np.asarray(a) for a in jit_sample(x, build_sampling_arrays([greedy] + others, hist, R))]
  alone = [np.asarray(a) for a in jit_sample(x, build_sampling_arrays([greedy], hist[:1], R))]
  assert mixed[0][0] == alone[0][0] == np.argmax(x[0])
  assert mixed[1][0] == alone[1][0]
  # Padding rows: greedy on raw logits, finite; live rows do not depend on how many rows pad.
  assert (mixed[0][4:] == np.argmax(x[4:], -1)).all() and np.isfinite(mixed[1][4:]).all()
  small = [np.asarray(a) for a in jit_sample(x[:4], build_sampling_arrays([greedy] + others, hist, 4))]
  for m, s in zip(mixed, small):
    np.testing.assert_array_equal(m[:4], s)


# ---------------------------------------------------------------------------------------------------
# multi-step decode


def toy_table(seed=10):
  """A next-token 'model': logits of the next token = table[previous token]; a strong self-loop makes
  plain greedy repeat itself, so only exact penalty counts in the scan move a penalised row off it."""
  return np.asarray(np.random.default_rng(seed).normal(size=(V, V)) + 8 * np.eye(V), np.float32)


def test_multi_step_scan_equals_single_steps_rebuilt_on_the_host():
  R, k, W = 8, 6, 32
  table = toy_table()
  rng = np.random.default_rng(11)
  prompts = [list(rng.integers(0, V, size=int(rng.integers(3, 10)))) for _ in range(5)]
  stop = int(prompts[2][-1])  # biased above the self-loop: the first token once min_tokens allows
  sps = [
    SamplingParams(presence_penalty=2, frequency_penalty=2, max_tokens=k),
    SamplingParams(temperature=1.0, seed=1, repetition_penalty=1.3, top_k=10, max_tokens=k),
    SamplingParams(
      temperature=0.8,
      seed=2,
      top_p=0.9,
      min_tokens=4,
      stop_token_ids=(stop,),
      logit_bias={stop: 20, 3: 1.5},
      max_tokens=k,
    ),
    SamplingParams(max_tokens=k),
    SamplingParams(
      temperature=1.0, seed=5, frequency_penalty=2, min_p=0.1, logprobs=True, top_logprobs=5, max_tokens=k
    ),
  ]
  tok0 = np.zeros(R, np.int32)
  tok0[:5] = [p[-1] for p in prompts]

  @jax.jit
  def scan(samp, tok):
    samp = init_penalty_state(samp, V)

    def one(carry, _):
      samp, tok = carry
      out = sample_rows(jnp.asarray(table)[tok], samp)
      return (advance(samp, out[0]), out[0]), out

    return jax.lax.scan(one, (samp, tok), None, length=k)[1]

  got = [np.asarray(a) for a in scan(build_sampling_arrays(sps, [(p, []) for p in prompts], R, W), tok0)]

  gens, tok, want = [[] for _ in prompts], tok0, []
  for _ in range(k):
    samp = build_sampling_arrays(sps, list(zip(prompts, gens)), R, W)  # the host's rebuild
    out = [np.asarray(a) for a in jit_sample(table[tok], samp)]
    for i, g in enumerate(gens):
      g.append(int(out[0][i]))
    tok, want = out[0], want + [out]
  want = [np.stack(a) for a in zip(*want)]
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[2][:, 4], want[2][:, 4])
  toks = got[0]
  assert len(set(toks[:, 3])) == 1, "plain greedy repeats its self-loop"
  assert len(set(toks[:, 0])) > 1, "the penalised greedy row must move off it within the scan"
  assert stop not in toks[:4, 2] and toks[4, 2] == stop


def test_advance_keeps_the_state_exact():
  R = 4
  sps = [SamplingParams(frequency_penalty=1, min_tokens=3, stop_token_ids=(1,)), SamplingParams(min_tokens=1)]
  samp = build_sampling_arrays(sps, [((5, 6), [7]), ((5,), [])], R, hist_width=16)
  st = jax.jit(init_penalty_state, static_argnums=1)(samp, V)
  for step, toks in enumerate(([7, 2, 0, 0], [9, 2, 0, 0])):
    st = jax.jit(advance)(st, jnp.asarray(toks, jnp.int32))
    assert np.asarray(st["counters"]).tolist() == [2 + step, 1 + step, 1 + step, 1 + step]
    assert np.asarray(st["min_tokens_left"]).tolist() == [max(0, 1 - step), 0, 0, 0]
  counts = np.asarray(st["gen_counts"])
  assert counts[0, 7] == 2 and counts[0, 9] == 1 and counts[0, 5] == 0 and counts[0].sum() == 3
  assert np.asarray(st["prompt_mask"])[0, [5, 6, 7]].tolist() == [True, True, False]


def test_width_zero_history():
  R = 4
  samp = build_sampling_arrays([SamplingParams(temperature=1.0, seed=3)], [((1, 2), [3])], R)
  assert samp["hist_ids"].shape == (R, 0)  # no penalised row: no [R, V] state
  st = init_penalty_state({k: jnp.asarray(v) for k, v in samp.items()}, V)
  assert st["gen_counts"].shape == (R, 0)
  assert int(advance(st, jnp.zeros(R, jnp.int32))["counters"][0]) == 2
  with pytest.raises(KeyError, match="init_penalty_state"):
    advance(samp, jnp.zeros(R, jnp.int32))


# ---------------------------------------------------------------------------------------------------
# fixed widths and the device penalty store (the engine's form)


def test_array_shapes_do_not_depend_on_requests():
  from jaxllm.serve.sampling import MAX_STOP_TOKEN_IDS

  R = 4
  few = [SamplingParams(logit_bias={1: 1.0}, stop_token_ids=(2,), min_tokens=1, max_tokens=4)]
  many = [
    SamplingParams(
      logit_bias={t: 0.5 for t in range(300)},
      stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS)),
      min_tokens=3,
      presence_penalty=1.0,
      max_tokens=9,
    )
  ] * 3
  shapes = lambda sps: {
    k: v.shape
    for k, v in build_sampling_arrays(
      sps, [((1, 2), [3])] * len(sps), R, pen_slots=[0] * len(sps), pen_steps=[1] * len(sps)
    ).items()
  }
  assert shapes(few) == shapes(many) == shapes([])
  with pytest.raises(ValueError, match="stop_token_ids"):
    SamplingParams(stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS + 1)))


def test_penalty_store_equals_history_state():
  """fill_penalty_slot (several fixed-size chunks) + count_tokens, read by gather_penalty_state, equal
  init_penalty_state of the whole history; rows count only their first pen_steps tokens."""
  from jaxllm.serve.penalties import PENALTY_FILL, count_tokens, fill_penalty_slot, gather_penalty_state, penalty_store

  rng = np.random.default_rng(0)
  R, S = 3, 4
  sps = [SamplingParams(presence_penalty=1.0), SamplingParams(), SamplingParams(repetition_penalty=1.2)]
  hist = [(list(rng.integers(0, V, PENALTY_FILL + 30)), list(rng.integers(0, V, 40))), ((1,), []), ((5, 6), [7])]
  slots = [2, -1, 0]
  store = penalty_store(S, V)
  fill = jax.jit(fill_penalty_slot)
  store = fill(store, 0, np.full(PENALTY_FILL, 9, np.int32), np.ones(PENALTY_FILL, np.int32), True)  # stale
  for (prompt, gen), slot in zip(hist, slots):
    if slot < 0:
      continue
    ids, kinds = np.asarray(list(prompt) + list(gen), np.int32), np.r_[[1] * len(prompt), [2] * len(gen)]
    for a in range(0, len(ids), PENALTY_FILL):
      pad = lambda x: np.pad(x[a : a + PENALTY_FILL], (0, PENALTY_FILL - len(x[a : a + PENALTY_FILL])))
      store = fill(store, slot, pad(ids).astype(np.int32), pad(kinds).astype(np.int32), a == 0)
  toks = rng.integers(0, V, (3, R)).astype(np.int32)  # a 3-step call; row 0 keeps 2 tokens, row 2 keeps 3
  samp = build_sampling_arrays(sps, hist, R, pen_slots=slots, pen_steps=[2, 3, 3])
  store = jax.jit(count_tokens)(store, samp, toks)
  kept = [(p, list(g) + list(toks[: [2, 3, 3][i], i])) for i, (p, g) in enumerate(hist)]
  want = init_penalty_state(build_sampling_arrays(sps, kept, R), V)
  got = jax.jit(gather_penalty_state)(samp, store)
  for i in (0, 2):
    np.testing.assert_array_equal(got["gen_counts"][i], want["gen_counts"][i])
    np.testing.assert_array_equal(got["prompt_mask"][i], want["prompt_mask"][i])
  assert not np.any(got["gen_counts"][1]) and not np.any(got["prompt_mask"][1])
