"""jaxllm.rl.learner: the chunked learner (log-probs, entropy and the RL loss chunk by chunk of
positions) against the plain computation over full logits, its compiled memory at a 152k vocabulary,
gradient accumulation, KL-shaped advantages and the resume checks.

The plain computation is the same code with model.loss_chunk=0 (autodiff through [B, T, V] logits);
the chunked one goes through the custom VJP, so their agreement checks the hand-written gradient.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose

from jaxllm.config import ConfigError, ModelConfig, RLConfig
from jaxllm.model.params import init_params, model_def
from jaxllm.rl import learner
from jaxllm.rl.losses import RLLossConfig, token_entropy, token_logprobs
from jaxllm.rl.rollout import Rollout
from jaxllm.train.metrics import compiled_temp_bytes
from jaxllm.train.step import TrainState, grads_and_metrics, make_train_step

TINY = ModelConfig(
  vocab_size=37, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=64, init_std=0.3, loss_chunk=0
)
B, T = 4, 12
TEMP = 0.7
# Every term on: decoupled correction with a cap that binds, clip-higher, dual clip, KL in the loss, entropy bonus.
LOSS = RLLossConfig(clip_high=0.28, dual_clip=3.0, is_cap=1.5, kl_coef=0.05, kl_estimator="k2", entropy_coef=0.02)


def mdef_with(chunk: int, **kw):
  return model_def(dataclasses.replace(TINY, loss_chunk=chunk, **kw))


def plain_logps(params, inputs, targets, **kw):
  """The reference: full fp32 logits and the public per-token helpers."""
  model = mdef_with(0, **kw).bind(params)
  logits = model(inputs).logits.astype(jnp.float32) / TEMP
  return token_logprobs(logits, targets), token_entropy(logits)


def rl_batch(params, seed=0, **kw):
  """A batch like build_batch's: a prompt (mask 0) then a completion per row, behaviour and proximal
  log-probs near the current ones (ratios straddle the clips, some weights above the cap), a reference."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32)
  targets = np.concatenate([inputs[:, 1:], rng.integers(0, TINY.vocab_size, (B, 1))], 1).astype(np.int32)
  mask = np.zeros((B, T), np.float32)
  for i, start in enumerate((2, 3, 5, 0)):
    mask[i, start : T - i] = 1.0
  logp, _ = plain_logps(params, inputs, targets, **kw)
  logp = np.asarray(logp)
  prox = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
  return {
    "inputs": inputs,
    "targets": targets,
    "mask": mask,
    "advantages": rng.normal(size=B).astype(np.float32),
    "logp_prox": prox,
    "logp_behav": (prox + rng.normal(0, 0.4, (B, T))).astype(np.float32),
    "logp_ref": (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32),
  }


@pytest.fixture(scope="module")
def params():
  return init_params(TINY, 0)


@pytest.mark.parametrize("chunk", [4, 5, 11])  # divides T, does not, a single partial second chunk
def test_token_logps_chunked_equal_full_logits(params, chunk):
  batch = rl_batch(params)
  want, _ = plain_logps(params, batch["inputs"], batch["targets"])
  for c in (0, chunk):
    got = learner.token_logps(mdef_with(c), params, batch, temperature=TEMP)
    assert got.shape == (B, T)
    assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=2e-6)


def objective_value_and_grad(mdef, params, batch, cfg=LOSS):
  obj = learner.rl_objective(cfg, TEMP)

  def f(p):
    loss, _, sums = obj.sums(mdef, p, batch)
    return loss, sums

  return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


@pytest.mark.parametrize("chunk,tie", [(4, False), (5, False), (5, True)])
def test_rl_objective_chunked_equals_full_logits(params, chunk, tie):
  """Loss, every metric sum and every parameter gradient (head, embedding, blocks) of the chunked
  objective equal those of the full-logits one to fp32 rounding, the entropy bonus's gradient included."""
  p = init_params(dataclasses.replace(TINY, tie_embeddings=True), 0) if tie else params
  batch = rl_batch(p, tie_embeddings=tie)
  (loss0, sums0), g0 = objective_value_and_grad(mdef_with(0, tie_embeddings=tie), p, batch)
  (loss1, sums1), g1 = objective_value_and_grad(mdef_with(chunk, tie_embeddings=tie), p, batch)
  # The example exercises every term: clipping, the cap, the KL and the entropy.
  assert float(sums0["clipped"]) > 0 and float(sums0["is_capped"]) > 0 and float(sums0["kl"]) > 0
  # The metrics against the public helpers on full logits.
  logp, ent = plain_logps(p, batch["inputs"], batch["targets"], tie_embeddings=tie)
  assert_allclose(float(sums1["entropy"]), float(jnp.sum(ent * batch["mask"])), rtol=1e-5)
  assert_allclose(float(loss1), float(loss0), rtol=1e-5, atol=1e-6)
  assert sums0.keys() == sums1.keys()
  for k in sums0:
    assert_allclose(float(sums1[k]), float(sums0[k]), rtol=1e-5, atol=1e-5, err_msg=k)
  flat0, flat1 = jax.tree.leaves_with_path(g0), jax.tree.leaves(g1)
  for (path, a), b in zip(flat0, flat1):
    scale = float(jnp.max(jnp.abs(a)))
    assert scale > 0, path
    assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_rl_objective_entropy_gradient_is_there(params):
  """The entropy bonus's gradient goes through the chunked path: changing entropy_coef changes the
  gradient by exactly that coefficient times the entropy's gradient (linear in the coefficient)."""
  batch = rl_batch(params)
  mdef = mdef_with(5)
  grads = [
    objective_value_and_grad(mdef, params, batch, dataclasses.replace(LOSS, entropy_coef=c))[1] for c in (0.0, 0.5, 1.0)
  ]
  d1 = jax.tree.map(lambda a, b: b - a, grads[0], grads[1])
  d2 = jax.tree.map(lambda a, b: b - a, grads[0], grads[2])
  head = np.asarray(d2["lm_head"])
  assert np.abs(head).max() > 1e-3
  assert_allclose(head, 2 * np.asarray(d1["lm_head"]), rtol=1e-3, atol=1e-6)


def test_grad_accum_equals_one_step(params):
  """grads_and_metrics with grad_accum=2 (strided halves of the rows, uneven token counts) equals
  grad_accum=1 for the RL objective: sums over chunks, one global denominator."""
  batch = {k: jnp.asarray(v) for k, v in rl_batch(params).items()}
  batch["advantages"] = jnp.repeat(batch["advantages"][:, None], T, axis=1)  # as the loop feeds it
  mdef = mdef_with(5)
  obj = learner.rl_objective(LOSS, TEMP)
  run = jax.jit(lambda p, b, n: grads_and_metrics(mdef, p, b, n, objective=obj), static_argnums=2)
  g1, m1 = run(params, batch, 1)
  g2, m2 = run(params, batch, 2)
  assert float(m1["tokens"]) == float(np.sum(np.asarray(batch["mask"])))
  for k in m1:
    assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))


# ---------------------------------------------------------------- memory at a real vocabulary

V_BIG, B_BIG = 152064, 8
BIG = ModelConfig(vocab_size=V_BIG, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=2048)


def rl_step_temp_bytes(T_: int, chunk: int) -> tuple[int, int]:
  """Compiled (never run) temp bytes of (the RL train step, the no-grad log-prob pass) at V = 152064."""
  mdef = model_def(dataclasses.replace(BIG, loss_chunk=chunk))
  tx = optax.adam(1e-4)
  p = mdef.abstract_params()
  S = jax.ShapeDtypeStruct
  state = TrainState(p, jax.eval_shape(tx.init, p), S((), jnp.int32))
  i32, f32 = S((B_BIG, T_), jnp.int32), S((B_BIG, T_), jnp.float32)
  batch = dict(inputs=i32, targets=i32, mask=f32, logp_behav=f32, logp_prox=f32, logp_ref=f32, advantages=f32)
  step = make_train_step(mdef, tx, objective=learner.rl_objective(LOSS, TEMP))
  logps = jax.jit(lambda params, b: learner.token_logps(mdef, params, b, temperature=TEMP))
  return compiled_temp_bytes(step, state, batch), compiled_temp_bytes(logps, p, batch)


def test_rl_step_at_152k_vocab_holds_no_full_logits():
  """Compile only: with model.loss_chunk=128 the RL train step (KL, entropy bonus, decoupled
  correction) and the proximal/reference pass at V = 152064, B = 8, T = 1024 need less temp memory
  than one [B, T, V] fp32 buffer (5.0 GB; with model.loss_chunk=0 the step needs about three, the pass
  one), a few [B, 128, V] chunks, and doubling T adds less than one chunk.
  Numbers: docs/rl.md ("Memory at a real vocabulary")."""
  one_full = B_BIG * 1024 * V_BIG * 4
  one_chunk = B_BIG * 128 * V_BIG * 4
  step_1k, logps_1k = rl_step_temp_bytes(1024, 128)
  step_512, logps_512 = rl_step_temp_bytes(512, 128)
  step_full, logps_full = rl_step_temp_bytes(1024, 0)  # the control: loss_chunk=0 holds full logits
  assert step_full > 2 * one_full and logps_full >= one_full
  assert step_1k < one_full and logps_1k < one_full
  assert step_1k < 4 * one_chunk and logps_1k < 2 * one_chunk
  assert step_1k - step_512 < one_chunk and abs(logps_1k - logps_512) < one_chunk / 8


# ---------------------------------------------------------------- advantages with the KL penalty


def test_kl_penalty_after_normalisation():
  """Equal task rewards in a group: GRPO gives 0, and the KL penalty subtracted after the
  normalisation leaves advantages of the KL's size (O(kl_coef)); subtracted before it, the group std
  is the KL's own spread and the advantages come out unit-size whatever kl_coef is."""
  kl_coef = 1e-3
  rewards = np.array([1, 1, 1, 1, 0, 1, 0, 1], np.float32)  # group 0: all equal; group 1: spread
  per_token = kl_coef * np.random.default_rng(0).uniform(0, 2, (8, 5)).astype(np.float32)
  pen = per_token.sum(1)
  adv = learner.advantages_of(rewards, 4, True, kl_penalty=pen)
  task_only = learner.advantages_of(rewards, 4, True)
  assert_allclose(adv, task_only - pen, rtol=1e-6)
  assert np.abs(adv[:4]).max() < 10 * kl_coef and np.abs(adv[:4]).max() > 0
  assert_allclose(np.abs(adv[4:]), 1.0, atol=20 * kl_coef)  # the task's +-1, shifted by the small KL
  old = learner.advantages_of(rewards - pen, 4, True)  # the order this replaces
  assert np.abs(old[:4]).max() > 1.0  # the KL alone, normalised to unit size
  # Dr. GRPO: the same order.
  assert_allclose(learner.advantages_of(rewards, 4, False, kl_penalty=pen)[:4], -pen[:4], rtol=1e-6)
  # Per-token penalties: reward-to-go, [B, T].
  adv_t = learner.advantages_of(rewards, 4, True, kl_penalty=per_token)
  assert adv_t.shape == (8, 5)
  assert_allclose(adv_t[:, 0], task_only - pen, rtol=1e-5, atol=1e-7)  # the first token sees every penalty
  assert_allclose(adv_t[:, -1], task_only - per_token[:, -1], rtol=1e-5, atol=1e-7)


def test_kl_in_reward_with_k2_is_a_config_error():
  with pytest.raises(ConfigError, match="rl.kl_estimator=k1"):
    RLConfig(kl_in="reward", kl_coef=0.01)  # the default estimator, k2
  RLConfig(kl_in="reward", kl_coef=0.01, kl_estimator="k1")
  RLConfig(kl_in="reward", kl_coef=0.0)  # no penalty: nothing to get wrong
  RLConfig(kl_coef=0.01)  # k2 in the loss


# ---------------------------------------------------------------- resume and accumulation checks


def pending(steps_and_versions):
  return [Rollout([], step, 0.0, version) for step, version in steps_and_versions]


def test_check_resume_names_the_setting():
  saved = dataclasses.asdict(RLConfig(eta=2))
  ahead = pending([(10, 8), (11, 9)])  # a checkpoint at step 10 with eta = 2: both 2 versions stale
  learner.check_resume(saved, RLConfig(eta=2), ahead)
  learner.check_resume(saved, RLConfig(eta=3, max_new_tokens=16, kl_coef=0.1), ahead)  # may grow; loss free
  learner.check_resume(saved, RLConfig(eta=0, group_size=4, temperature=0.5), [])  # nothing pending
  with pytest.raises(ConfigError, match=r"rl.eta=1 .*2 weight versions stale .*rl.eta=2\).*rl.eta>=2"):
    learner.check_resume(saved, RLConfig(eta=1), ahead)
  # Early in a run the pending rollouts are less stale than eta: a lower eta that covers them is fine.
  learner.check_resume(saved, RLConfig(eta=1), pending([(1, 0), (2, 1)]))
  for key, value in (("group_size", 4), ("prompts_per_step", 4), ("temperature", 0.5)):
    with pytest.raises(ConfigError, match=f"rl.{key}={value!r} but .*generated with rl.{key}="):
      learner.check_resume(saved, RLConfig(eta=2, **{key: value}), ahead)
  with pytest.raises(ConfigError, match="rl.max_new_tokens=4 is below the checkpoint's 8"):
    learner.check_resume(saved, RLConfig(eta=2, max_new_tokens=4), ahead)


def test_minibatch_rows_checks_grad_accum():
  rl = RLConfig(prompts_per_step=8, group_size=4, minibatches=2)  # 16 rows per optimizer step
  assert learner.minibatch_rows(rl, 2, 4) == 16
  with pytest.raises(ConfigError, match="train.grad_accum=3 .*mesh.dp=1"):
    learner.minibatch_rows(rl, 3, 1)
  with pytest.raises(ConfigError, match="train.grad_accum=4 .*mesh.dp=8"):
    learner.minibatch_rows(rl, 4, 8)


def test_chunked_learner_on_a_dp_tp_mesh():
  """On a dp=4 x tp=2 mesh (vocab over tp, rows over dp) the chunked log-prob pass and train step give
  the full-logits results: the chunks' sharding annotations do not change the numbers."""
  from jaxllm.config import MeshConfig, TrainConfig
  from jaxllm.parallel import build_mesh, mesh_hooks
  from jaxllm.parallel.sharding import batch_sharding
  from jaxllm.train.optim import make_optimizer
  from jaxllm.train.state import init_state, state_shardings

  mesh, plan = build_mesh(MeshConfig(dp=4, tp=2))
  kw = dict(vocab_size=40, n_kv_heads=2)
  tx = make_optimizer(TrainConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=0.0), mdef_with(0, **kw).logical)
  out = []
  for chunk in (0, 5):
    mdef = mdef_with(chunk, **kw)
    sh, hk, b_sh = state_shardings(mdef, tx, mesh, plan), mesh_hooks(mesh, plan, mdef.cfg), batch_sharding(mesh, plan)
    state = init_state(mdef, tx, sh, 0)
    batch = rl_batch(state.params, **kw)
    batch["advantages"] = np.repeat(batch["advantages"][:, None], T, axis=1)
    batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, b_sh)
    step = make_train_step(mdef, tx, sh, b_sh, hook_kwargs=hk, objective=learner.rl_objective(LOSS, TEMP))
    with jax.set_mesh(mesh):
      logps = learner.token_logps(mdef, state.params, batch, hk, TEMP)
      state, metrics = step(state, batch)
    out.append((np.asarray(logps), jax.device_get(metrics), jax.device_get(state.params)))
  (lp0, m0, p0), (lp1, m1, p1) = out
  assert_allclose(lp1, lp0, rtol=1e-6, atol=2e-6)
  assert bool(m1["finite"])
  for k in ("loss", "grad_norm", "entropy", "kl", "clipped"):
    assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_batch_invariant_logprob_pass_holds_no_full_logits():
  """Compile only: under model.batch_invariant the proximal/reference pass at V = 152064, B = 8,
  T = 1024 holds HEAD_CHUNK rows of logits at a time (jaxllm.model.invariant.head_logprobs), far
  under one [B, T, V] fp32 buffer (5.0 GB), and the same at T = 512 and 1024."""
  from jaxllm.model.invariant import HEAD_CHUNK

  mdef = model_def(dataclasses.replace(BIG, batch_invariant=True))
  p = mdef.abstract_params()

  def temp_bytes(T_):
    i32 = jax.ShapeDtypeStruct((B_BIG, T_), jnp.int32)
    logps = jax.jit(lambda params, b: learner.token_logps(mdef, params, b, temperature=TEMP))
    return compiled_temp_bytes(logps, p, dict(inputs=i32, targets=i32))

  one_full, one_chunk = B_BIG * 1024 * V_BIG * 4, HEAD_CHUNK * V_BIG * 4
  t_1k, t_512 = temp_bytes(1024), temp_bytes(512)
  assert t_1k < 3 * one_chunk < one_full / 10
  assert abs(t_1k - t_512) < one_chunk
