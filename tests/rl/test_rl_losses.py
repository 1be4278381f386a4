"""jaxllm.rl.losses against numpy written here, on small fixed examples (no golden arrays).

Covers GRPO / Dr. GRPO advantages, the PPO clipped surrogate with DAPO clip-higher and dual clip
(tokens on both sides of every boundary, masks, gradients), the behaviour-policy corrections
(decoupled, TIS, none), the KL estimators' values and their expected gradients on an exact
categorical and on exactly enumerated 2-token sequences, global-denominator aggregation over uneven
chunks, and the entropy helper.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from jaxllm.config import ConfigError
from jaxllm.rl import learner
from jaxllm.rl.losses import (
  RLLossConfig,
  grpo_advantages,
  kl_estimate,
  kl_reward_penalty,
  metric_means,
  ppo_surrogate,
  rl_loss,
  token_entropy,
  token_logprobs,
)

F64 = np.float64


@jax.jit(static_argnums=2)
def _loss_and_grad(logp, batch, cfg):
  return jax.value_and_grad(lambda lp: (lambda o: (o[0], o[1:]))(rl_loss(lp, batch, cfg)), has_aux=True)(logp)


def loss_and_grad(logp, batch, cfg):
  """Jitted (eager dispatch of every small op is the slow part on CPU) -> python floats, numpy grad."""
  (loss, (count, sums, maxes)), g = _loss_and_grad(logp, batch, cfg)
  return (
    float(loss),
    float(count),
    {k: float(v) for k, v in sums.items()},
    {k: float(v) for k, v in maxes.items()},
    np.asarray(g),
  )


# ---------------------------------------------------------------- GRPO advantages


def test_grpo_advantages_match_numpy():
  r = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0.5, 0.2, 0.9, 0.0], np.float32)  # 3 prompts x 4 samples
  g = r.reshape(3, 4).astype(F64)
  centred = g - g.mean(1, keepdims=True)
  want_std = centred / (g.std(1, keepdims=True) + 1e-6)
  got = np.asarray(grpo_advantages(jnp.asarray(r), 4))
  assert_allclose(got, want_std.reshape(-1), rtol=1e-5, atol=1e-6)
  assert_array_equal(got[4:8], 0.0)  # equal rewards: no signal, no NaN
  assert_allclose(got[:4], [1, -1, -1, 1], rtol=1e-5)  # +-1 for a 50/50 group
  dr = np.asarray(grpo_advantages(jnp.asarray(r), 4, normalize_std=False))
  assert_allclose(dr, centred.reshape(-1), rtol=1e-6, atol=1e-7)
  jitted = jax.jit(grpo_advantages, static_argnums=(1, 2))(jnp.asarray(r), 4, True)
  assert_allclose(np.asarray(jitted), got, rtol=1e-6)
  with pytest.raises(ValueError, match="group_size=5"):
    grpo_advantages(jnp.asarray(r), 5)


# ---------------------------------------------------------------- PPO / DAPO / dual clip

# Row 0: A = +1, ratios across the upper boundaries 1.2 (PPO) and 1.28 (DAPO); lower clip inactive for A > 0.
# Row 1: A = -2, ratios across the lower boundary 0.8 and the dual-clip bound c = 3.
# Column 8 is masked out and holds garbage (log-ratio 60: exp overflows fp32 if not guarded).
RATIOS = np.array([[0.5, 0.79, 1.0, 1.1, 1.19, 1.21, 1.25, 1.3, 1.0], [0.5, 0.79, 0.81, 1.0, 1.5, 2.9, 3.1, 9.0, 1.0]])
ADV = np.array([1.0, -2.0], np.float32)


def ppo_batch():
  rng = np.random.default_rng(0)
  logp_old = rng.uniform(-3, -0.1, RATIOS.shape).astype(np.float32)
  logp = (logp_old + np.log(RATIOS)).astype(np.float32)
  logp[:, 8] = logp_old[:, 8] + 60.0
  mask = np.ones(RATIOS.shape, np.float32)
  mask[:, 8] = 0
  return logp, dict(mask=mask, advantages=ADV, logp_behav=logp_old)


def np_ppo(logp, logp_old, adv, mask, lo, hi, c):
  """-> (loss sum, d loss / d logp [B, T], clipped count, dual-clipped count), float64 numpy."""
  r = np.exp(np.where(mask > 0, logp.astype(F64) - logp_old.astype(F64), 0.0))
  a = np.broadcast_to(adv.astype(F64)[:, None] if adv.ndim == 1 else adv.astype(F64), r.shape)
  unclipped, clipped_term = -a * r, -a * np.clip(r, 1 - lo, 1 + hi)
  clipped = clipped_term > unclipped
  loss = np.maximum(unclipped, clipped_term)
  dual = np.zeros_like(clipped)
  if c:
    dual = (a < 0) & (loss > -c * a)
    loss = np.where(dual, -c * a, loss)
  grad = np.where(clipped | dual, 0.0, -a * r) * mask
  return (loss * mask).sum(), grad, (clipped * mask).sum(), (dual * mask).sum()


@pytest.mark.parametrize(
  "lo,hi,c,n_clipped,n_dual",
  [
    (0.2, 0.2, 0.0, 3 + 2, 0),  # row 0: 1.21, 1.25, 1.3 above 1.2; row 1: 0.5, 0.79 below 0.8
    (0.2, 0.28, 0.0, 1 + 2, 0),  # DAPO clip-higher: only 1.3 above 1.28
    (0.2, 0.28, 3.0, 1 + 2, 2),  # dual clip: 3.1 and 9.0 exceed c = 3 for A < 0, 2.9 does not
  ],
)
def test_ppo_clipping_matches_numpy(lo, hi, c, n_clipped, n_dual):
  logp, batch = ppo_batch()
  cfg = RLLossConfig(clip_low=lo, clip_high=hi, dual_clip=c, correction="none")
  loss, count, sums, maxes, grad = loss_and_grad(jnp.asarray(logp), batch, cfg)
  want_loss, want_grad, want_clipped, want_dual = np_ppo(logp, batch["logp_behav"], ADV, batch["mask"], lo, hi, c)
  assert count == 16
  assert_allclose(loss, want_loss, rtol=1e-5)
  assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  assert (want_clipped, want_dual) == (n_clipped, n_dual)  # the example straddles each boundary
  assert (sums["clipped"], sums["dual_clipped"]) == (n_clipped, n_dual)
  assert np.all(np.isfinite(grad)) and grad[0, 8] == grad[1, 8] == 0.0
  assert_allclose(sums["ratio"], RATIOS[:, :8].sum(), rtol=1e-5)
  assert_allclose(maxes["ratio"], 9.0, rtol=1e-5)  # the masked garbage column does not count
  assert_allclose(sums["pg_loss"], loss, rtol=1e-6)
  # A dual-clip token has no gradient; a row-1 token just above the lower clip does.
  if c:
    assert grad[1, 6] == grad[1, 7] == 0.0 and grad[1, 5] != 0.0
  assert grad[1, 2] != 0.0


def test_ppo_surrogate_standalone():
  r = jnp.array([0.7, 1.0, 1.3, 0.7, 1.3, 4.0])
  a = jnp.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
  loss, clipped, dual = ppo_surrogate(r, a, 0.2, 0.2, 3.0)
  assert_allclose(np.asarray(loss), [-0.7, -1.0, -1.2, 0.8, 1.3, 3.0], rtol=1e-6)
  assert np.asarray(clipped).tolist() == [False, False, True, True, False, False]
  assert np.asarray(dual).tolist() == [False, False, False, False, False, True]


# ---------------------------------------------------------------- behaviour-policy correction


def random_batch(seed, b=3, t=6, prox_equals_behav=False):
  rng = np.random.default_rng(seed)
  logp = rng.uniform(-3, -0.05, (b, t)).astype(np.float32)
  behav = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  prox = behav.copy() if prox_equals_behav else (behav + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  mask = (rng.uniform(size=(b, t)) < 0.75).astype(np.float32)
  mask[0, 0] = 1
  return logp, dict(
    mask=mask,
    advantages=rng.normal(size=b).astype(np.float32),
    logp_behav=behav,
    logp_prox=prox,
    logp_ref=(logp + rng.normal(0, 0.5, (b, t))).astype(np.float32),
    entropy=rng.uniform(0, 2, (b, t)).astype(np.float32),
  )


@pytest.mark.parametrize("correction", ["decoupled", "tis"])
def test_correction_is_plain_ppo_when_behaviour_is_proximal(correction):
  logp, batch = random_batch(1, prox_equals_behav=True)
  kw = dict(clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)
  got = loss_and_grad(jnp.asarray(logp), batch, RLLossConfig(correction=correction, **kw))
  plain = loss_and_grad(
    jnp.asarray(logp), {k: v for k, v in batch.items() if k != "logp_prox"}, RLLossConfig(correction="none", **kw)
  )
  assert got[0] == plain[0] and got[1] == plain[1]  # exactly, not approximately
  assert_array_equal(got[4], plain[4])
  assert got[2]["is_capped"] == 0 and got[2]["is_weight"] == got[1]


LOG_W = np.array(
  [
    [-0.7, 0.0, 0.4, 0.69, 1.2, 1.7],  # w = 0.50 1 1.49 1.99 3.32 5.47
    [2.5, -1.5, 0.9, 1.0, 1.65, 0.1],
  ]
)  # w = 12.2 0.22 2.46 2.72 5.21 1.11


@pytest.mark.parametrize("correction,cap", [("decoupled", 5.0), ("tis", 2.0), ("decoupled", 3.0)])
def test_correction_with_stale_behaviour_matches_numpy(correction, cap):
  rng = np.random.default_rng(2)
  prox = rng.uniform(-3, -0.1, LOG_W.shape).astype(np.float32)
  behav = (prox - LOG_W).astype(np.float32)
  logp = (prox + rng.normal(0, 0.2, LOG_W.shape)).astype(np.float32)
  mask = np.ones(LOG_W.shape, np.float32)
  mask[1, 5] = 0
  adv = np.array([0.8, -1.3], np.float32)
  batch = dict(mask=mask, advantages=adv, logp_behav=behav, logp_prox=prox)
  is_cap = None if cap in (5.0, 2.0) else cap  # None: the correction's default cap
  cfg = RLLossConfig(correction=correction, is_cap=is_cap)
  assert cfg.cap == cap
  loss, count, sums, maxes, grad = loss_and_grad(jnp.asarray(logp), batch, cfg)

  w = np.exp(prox.astype(F64) - behav.astype(F64))
  over = (w > cap) & (mask > 0)
  w_used = np.where(over, 0.0, w) if correction == "decoupled" else np.minimum(w, cap)
  _, pg_grad, _, _ = np_ppo(logp, prox, adv, mask, 0.2, 0.2, 0.0)  # ratio current / proximal
  r = np.exp(logp.astype(F64) - prox.astype(F64))
  a = adv.astype(F64)[:, None]
  per_tok = np.maximum(-a * r, -a * np.clip(r, 0.8, 1.2))
  assert_allclose(loss, (per_tok * w_used * mask).sum(), rtol=1e-5)
  assert_allclose(grad, pg_grad * w_used, rtol=1e-5, atol=1e-6)
  assert sums["is_capped"] == over.sum() > 0
  assert_allclose(sums["is_weight"], (w * mask).sum(), rtol=1e-5)
  assert_allclose(maxes["is_weight"], np.exp(2.5), rtol=1e-5)
  m = metric_means(sums, maxes, count)
  assert_allclose(m["is_capped"], over.sum() / 11, rtol=1e-6)  # the masked (capped) fraction
  if correction == "tis":
    assert w_used.max() == 2.0 and np.all(grad[over] != 0)  # truncated, not dropped
  else:
    assert np.all(grad[over] == 0)  # dropped from the policy gradient


def test_missing_inputs_are_named():
  logp, batch = random_batch(3)
  del batch["logp_prox"]
  with pytest.raises(KeyError, match="logp_prox"):
    rl_loss(jnp.asarray(logp), batch, RLLossConfig(correction="tis"))
  with pytest.raises(KeyError, match="logp_ref"):
    rl_loss(
      jnp.asarray(logp),
      {k: v for k, v in batch.items() if k != "logp_ref"},
      RLLossConfig(correction="none", kl_coef=0.1),
    )


# ---------------------------------------------------------------- KL estimators


def test_kl_estimator_values_and_placement():
  logp, batch = random_batch(4)
  mask, ref = batch["mask"], batch["logp_ref"]
  d = logp.astype(F64) - ref.astype(F64)
  want = {"k1": d, "k2": 0.5 * d * d, "k3": np.exp(-d) - (-d) - 1}
  plain = loss_and_grad(jnp.asarray(logp), batch, RLLossConfig(correction="none"))  # kl_coef 0
  for est, w in want.items():
    assert_allclose(np.asarray(kl_estimate(jnp.asarray(logp), jnp.asarray(ref), est)), w, rtol=1e-5, atol=1e-6)
    in_loss = loss_and_grad(jnp.asarray(logp), batch, RLLossConfig(correction="none", kl_estimator=est, kl_coef=0.1))
    assert_allclose(in_loss[0] - plain[0], 0.1 * (w * mask).sum(), rtol=1e-4, atol=1e-6)
    assert_allclose(in_loss[2]["kl"], (w * mask).sum(), rtol=1e-5)
    cfg = RLLossConfig(kl_coef=0.1, kl_estimator=est, kl_in="reward")
    _, pen_grad = jax.value_and_grad(
      lambda lp: jnp.sum(kl_reward_penalty(lp, jnp.asarray(ref), jnp.asarray(mask), cfg))
    )(jnp.asarray(logp))
    assert_allclose(
      np.asarray(kl_reward_penalty(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(mask), cfg)),
      0.1 * w * mask,
      rtol=1e-5,
      atol=1e-7,
    )
    assert not np.any(np.asarray(pen_grad))  # a reward: no gradient
  # kl_in="reward": reported, not in the loss.
  in_reward = loss_and_grad(jnp.asarray(logp), batch, RLLossConfig(correction="none", kl_coef=0.1, kl_in="reward"))
  assert in_reward[0] == plain[0]
  assert_array_equal(in_reward[4], plain[4])
  assert_allclose(in_reward[2]["kl"], (want["k2"] * mask).sum(), rtol=1e-5)  # the default estimator, k2


def test_kl_gradients_on_a_categorical():
  """Exact expectations over x ~ pi of the gradients the sampled-token losses produce, compared with
  the analytic gradient of the reverse KL(pi||ref) w.r.t. the logits, for one token (sequences:
  test_kl_placements_on_two_token_sequences, where k2 in the loss is no longer exact).

  Found (asserted below): k2 in the loss and k1 in the reward give grad KL(pi||ref); k1 in the loss
  gives 0; k3 in the loss gives grad KL(ref||pi) (forward KL), not the reverse one; k2 and k3 in the
  reward give neither. In value, E[k1] = E[k3] = KL(pi||ref) and E[k2] != KL(pi||ref).
  """
  theta = np.array([0.3, -1.2, 1.5, 0.1, -0.4])
  ref_logits = np.array([-0.5, 0.7, 0.2, -1.0, 0.9])

  def log_softmax(z):
    return z - np.log(np.exp(z - z.max()).sum()) - z.max()

  pi, ref = np.exp(log_softmax(theta)), np.exp(log_softmax(ref_logits))
  dl = np.log(pi) - np.log(ref)
  reverse = (pi * dl).sum()
  rev_grad = pi * (dl - (pi * dl).sum())  # d/dtheta sum_x pi (log pi - log ref)
  fwd_grad = pi - ref  # d/dtheta sum_x ref (log ref - log pi)
  # The analytic formulas against central differences of the KLs themselves (float64).
  eps = 1e-6
  for formula, kl in (
    (rev_grad, lambda z: (np.exp(log_softmax(z)) * (log_softmax(z) - np.log(ref))).sum()),
    (fwd_grad, lambda z: (ref * (np.log(ref) - log_softmax(z))).sum()),
  ):
    fd = np.array([(kl(theta + eps * e) - kl(theta - eps * e)) / (2 * eps) for e in np.eye(5)])
    assert_allclose(formula, fd, atol=1e-8)

  logref = jnp.asarray(np.log(ref), jnp.float32)[None]

  def expected(est, kl_in):
    """E_{x~pi}[the loss on token x] as a function of the logits; every outcome is one token of a
    [1, V] row, weighted by pi through the mask with no gradient (what sampling gives)."""

    def f(th):
      logp = jax.nn.log_softmax(th)[None]
      p = jax.lax.stop_gradient(jnp.exp(logp))
      cfg = RLLossConfig(correction="none", kl_coef=1.0, kl_estimator=est, kl_in=kl_in)
      batch = dict(mask=p, logp_behav=jax.lax.stop_gradient(logp), logp_ref=logref, advantages=jnp.zeros((1, 5)))
      if kl_in == "reward":  # on-policy: the penalty uses the sampling policy's log-probs
        batch["advantages"] = -kl_reward_penalty(jax.lax.stop_gradient(logp), logref, p, cfg)
      loss_sum, count, _, _ = rl_loss(logp, batch, cfg)
      return loss_sum / count

    return jax.value_and_grad(f)(jnp.asarray(theta, jnp.float32))

  got = {(est, kl_in): expected(est, kl_in) for est in ("k1", "k2", "k3") for kl_in in ("loss", "reward")}
  g = {key: np.asarray(v[1], F64) for key, v in got.items()}

  def matches(x, y):
    return np.allclose(x, y, atol=2e-6)

  assert np.abs(rev_grad).max() > 0.05 and np.abs(rev_grad - fwd_grad).max() > 0.05  # a telling example
  assert matches(g["k1", "loss"], 0.0) and not matches(g["k1", "loss"], rev_grad)
  assert matches(g["k2", "loss"], rev_grad)
  assert matches(g["k3", "loss"], fwd_grad) and not matches(g["k3", "loss"], rev_grad)
  assert matches(g["k1", "reward"], rev_grad)
  assert not matches(g["k2", "reward"], rev_grad) and not matches(g["k3", "reward"], rev_grad)
  # Values: the in-loss objectives are E[k].
  assert_allclose(float(got["k1", "loss"][0]), reverse, rtol=1e-5)
  assert_allclose(float(got["k3", "loss"][0]), reverse, rtol=1e-5)
  assert abs(float(got["k2", "loss"][0]) - reverse) > 1e-2


V2 = 3  # the two-token example: vocabulary of 3, so 9 sequences
X1, X2 = np.repeat(np.arange(V2), V2), np.tile(np.arange(V2), V2)  # row i is the sequence (X1[i], X2[i])


def two_token_logps(th1, th2):
  """Logits th1 [V] of the first token and th2 [V, V] of the second given the first -> the log-probs
  [9, 2] of each sequence's two tokens (row = sequence, as the learner's [B, T] arrays)."""
  return jnp.stack([jax.nn.log_softmax(th1)[X1], jax.nn.log_softmax(th2, axis=-1)[X1, X2]], 1)


def two_token_gradients():
  """Exact gradients (by enumeration, no sampling) for a 2-step categorical policy with free logits:
  the sequence-level reverse KL(pi||ref) and the expectation under pi of each KL placement's gradient.
  -> ({name: flat gradient}, the reference gradients {name: flat gradient})."""
  rng = np.random.default_rng(11)
  theta = (jnp.asarray(rng.normal(0, 1.0, V2), jnp.float32), jnp.asarray(rng.normal(0, 1.0, (V2, V2)), jnp.float32))
  ref = (rng.normal(0, 1.0, V2), rng.normal(0, 1.0, (V2, V2)))
  logref = two_token_logps(*(jnp.asarray(r, jnp.float32) for r in ref))
  logp0 = two_token_logps(*theta)
  prob = jnp.exp(logp0.sum(1))  # pi(x) of each sequence: the expectation's weights, no gradient
  mask = jnp.repeat(prob[:, None], 2, axis=1)

  def flat(g):
    return np.concatenate([np.asarray(x, F64).ravel() for x in g])

  def sequence_kl(th):  # KL(pi||ref) over whole sequences, exact
    lp = two_token_logps(*th)
    return jnp.sum(jnp.exp(lp.sum(1)) * (lp - logref).sum(1))

  def per_token_kl(th, forward):  # sum_t E_{x<t ~ pi}[KL(pi_t||ref_t)] with the prefix distribution held fixed
    lq = (jax.nn.log_softmax(th[0]), jax.nn.log_softmax(th[1], axis=-1))
    lr = tuple(jax.nn.log_softmax(jnp.asarray(r, jnp.float32), axis=-1) for r in ref)
    a, b = (lr, lq) if forward else (lq, lr)
    kl = [jnp.sum(jnp.exp(a[t]) * (a[t] - b[t]), -1) for t in range(2)]
    return kl[0] + jnp.sum(jax.lax.stop_gradient(jnp.exp(lq[0])) * kl[1])

  refs = {
    "sequence reverse KL": flat(jax.grad(sequence_kl)(theta)),
    "per-token reverse KL": flat(jax.grad(per_token_kl)(theta, False)),
    "per-token forward KL": flat(jax.grad(per_token_kl)(theta, True)),
  }

  def expected_grad(est, kl_in, penalty="sequence"):
    """E_{x~pi}[gradient of rl_loss on x]: each sequence a row, weighted by pi(x) through the mask."""
    cfg = RLLossConfig(correction="none", kl_coef=1.0, kl_estimator=est, kl_in=kl_in)
    adv = np.zeros(9, np.float32)
    if kl_in == "reward":  # task rewards all 0, so the advantages are the KL's alone
      pen = np.asarray(kl_reward_penalty(logp0, logref, jnp.ones((9, 2)), cfg))  # [9, 2], no gradient
      if penalty == "normalised with it":  # the order learner.advantages_of replaces
        adv = learner.advantages_of(adv - pen.sum(1), 9, True)
      else:
        adv = learner.advantages_of(adv, 9, True, kl_penalty=pen if penalty == "to-go" else pen.sum(1))
    batch = dict(mask=mask, advantages=adv, logp_behav=logp0, logp_ref=logref)
    return flat(jax.grad(lambda th: rl_loss(two_token_logps(*th), batch, cfg)[0])(theta))

  got = {f"{est} in the loss": expected_grad(est, "loss") for est in ("k1", "k2", "k3")}
  got.update({f"{est} in the reward": expected_grad(est, "reward") for est in ("k1", "k2", "k3")})
  got["k1 in the reward, reward-to-go"] = expected_grad("k1", "reward", "to-go")
  got["k1 in the reward, normalised with the task reward"] = expected_grad("k1", "reward", "normalised with it")
  return got, refs


def test_kl_placements_on_two_token_sequences():
  """Which KL placement gives the gradient of the sequence-level KL(pi||ref), exactly: a 2-token
  categorical policy (vocabulary 3, the second token's logits depend on the first), every sequence
  enumerated. k1 as a reward with REINFORCE (summed over the sequence or as reward-to-go, subtracted
  after the GRPO normalisation) is exact. k2 in the loss is not: it is the per-token KL's gradient
  with the prefix distribution held fixed, which misses how the first token moves the second's KL
  (its gradient is exact for the last token's logits only). k3 in the loss gives the per-token
  forward KL's gradient; k1 in the loss gives 0; k2 and k3 as rewards give none of these; the KL
  normalised together with the task reward gives the right direction at the wrong (1/std) scale."""
  got, refs = two_token_gradients()
  true = refs["sequence reverse KL"]
  n1 = V2  # the first V2 entries are the first token's logits, the rest the second's

  def same(a, b):
    return np.allclose(a, b, atol=2e-6)

  assert np.abs(true - refs["per-token reverse KL"]).max() > 0.05  # a telling example
  for name in ("k1 in the reward", "k1 in the reward, reward-to-go"):
    assert same(got[name], true), name
  assert not same(got["k2 in the loss"], true) and same(got["k2 in the loss"], refs["per-token reverse KL"])
  assert same(got["k2 in the loss"][n1:], true[n1:]) and not same(got["k2 in the loss"][:n1], true[:n1])
  assert same(got["k3 in the loss"], refs["per-token forward KL"]) and not same(got["k3 in the loss"], true)
  assert same(got["k1 in the loss"], 0.0)
  for name in ("k2 in the reward", "k3 in the reward"):
    assert not any(same(got[name], r) for r in refs.values()), name
  scaled = got["k1 in the reward, normalised with the task reward"]
  assert not same(scaled, true) and same(scaled / (scaled @ true) * (true @ true), true)  # parallel, not equal


# ---------------------------------------------------------------- global denominators


def test_uneven_chunks_sum_to_the_unsplit_loss():
  logp, batch = random_batch(5, b=5, t=7)
  batch["mask"][2] = 0  # a row with no counted tokens
  batch["mask"][3, :] = 1
  batch["advantages"] = np.random.default_rng(6).normal(size=(5, 7)).astype(np.float32)  # per-token form
  cfg = RLLossConfig(correction="decoupled", clip_high=0.28, dual_clip=3.0, is_cap=1.2, kl_coef=0.05, entropy_coef=0.01)
  full_loss, full_count, full_sums, full_maxes, full_grad = loss_and_grad(jnp.asarray(logp), batch, cfg)
  assert full_sums["is_capped"] > 0 and full_sums["clipped"] > 0

  chunks = [slice(0, 1), slice(1, 4), slice(4, 5)]
  total = sum(float(np.sum(batch["mask"][c])) for c in chunks)

  def split_loss(lp):
    outs = [rl_loss(lp[c], {k: v[c] for k, v in batch.items()}, cfg) for c in chunks]
    return sum(o[0] for o in outs) / total, outs

  (loss, outs), grad = jax.jit(jax.value_and_grad(split_loss, has_aux=True))(jnp.asarray(logp))
  assert total == full_count == sum(float(o[1]) for o in outs)
  assert_allclose(float(loss), full_loss / full_count, rtol=1e-6)
  assert_allclose(np.asarray(grad) * full_count, full_grad, rtol=1e-5, atol=1e-7)
  for k, v in full_sums.items():
    assert_allclose(sum(float(o[2][k]) for o in outs), v, rtol=1e-5, atol=1e-6)
  for k, v in full_maxes.items():
    assert max(float(o[3][k]) for o in outs) == v
  # The mean of per-chunk means would be a different (biased) number.
  per_chunk = [float(o[0]) / max(float(o[1]), 1.0) for o in outs]
  assert abs(np.mean(per_chunk) - full_loss / full_count) > 1e-3
  # jit with the config static gives the same numbers.
  jitted = jax.jit(rl_loss, static_argnums=2)(jnp.asarray(logp), batch, cfg)
  assert_allclose(float(jitted[0]), full_loss, rtol=1e-6)


# ---------------------------------------------------------------- entropy, log-probs, config


def test_token_entropy_and_logprobs_match_numpy():
  rng = np.random.default_rng(7)
  logits = rng.normal(0, 2, (2, 3, 6)).astype(np.float32)
  logits[0, 1] = [30, 0, 0, 0, 0, 0]  # nearly one-hot
  logits[1, 2, 4] = -np.inf  # a banned token
  z = logits.astype(F64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)
  got = np.asarray(token_entropy(jnp.asarray(logits)))
  assert np.all(np.isfinite(got))
  assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  targets = rng.integers(0, 4, (2, 3))
  lp = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
  assert_allclose(lp, np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0]), rtol=1e-5, atol=1e-6)
  # The bonus: loss -= entropy_coef * sum of H over counted tokens.
  logp, batch = random_batch(8)
  plain = loss_and_grad(jnp.asarray(logp), batch, RLLossConfig())
  bonus = loss_and_grad(jnp.asarray(logp), batch, RLLossConfig(entropy_coef=0.01))
  assert_allclose(plain[0] - bonus[0], 0.01 * (batch["entropy"] * batch["mask"]).sum(), rtol=1e-4)
  assert_allclose(bonus[2]["entropy"], (batch["entropy"] * batch["mask"]).sum(), rtol=1e-5)


@pytest.mark.parametrize(
  "field,value",
  [
    ("clip_low", 1.0),
    ("clip_low", -0.1),
    ("clip_high", -0.2),
    ("dual_clip", 0.5),
    ("correction", "ppo"),
    ("is_cap", 0.5),
    ("kl_coef", -1.0),
    ("kl_estimator", "k4"),
    ("kl_in", "advantage"),
    ("entropy_coef", float("nan")),
  ],
)
def test_config_errors_name_the_field(field, value):
  with pytest.raises(ConfigError, match=f"RLLossConfig.{field}=.*allowed"):
    RLLossConfig(**{field: value})


def test_config_caps_and_hashable():
  assert RLLossConfig().cap == 5.0 and RLLossConfig(correction="tis").cap == 2.0
  assert RLLossConfig(correction="none").cap == float("inf") and RLLossConfig(is_cap=0.0).cap == float("inf")
  assert hash(RLLossConfig(clip_high=0.28)) == hash(RLLossConfig(clip_high=0.28))
