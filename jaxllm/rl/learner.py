"""The learner: jaxllm.train's one train step with an RL objective (same mesh, sharding, optimizer and
checkpoints as pretraining), and the batch it consumes.

A rollout becomes [B, T] arrays: inputs/targets are prompt + completion shifted by one, `mask` is 1
on the targets that are completion tokens, `logp_behav` holds the sampler's log-probs there, and
`advantages` the sample's GRPO advantage on every token. Before the update the learner adds
`logp_prox` (its own log-probs under the weights it is about to update; decoupled PPO's proximal
policy) and, with a KL term, `logp_ref` (the frozen reference's), each one no-grad forward pass.

Neither those passes nor the training objective hold the [B, T, V] fp32 logits (about 39 GB at
V = 152k, B = 64, T = 1k): the head, the log-probs, the entropy and the loss go chunk by chunk of
model.loss_chunk positions, as the language-model loss does (jaxllm.rl.losses.chunked_rl_sums and
chunked_token_logprobs).

Shapes: the package legend in jaxllm/__init__.py (B samples, T tokens, V).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.buckets import pow2_bucket
from jaxllm.config import ConfigError, RLConfig
from jaxllm.model import hooks, invariant
from jaxllm.model.transformer import aux_loss
from jaxllm.parallel.invariant_tp import learner_logprobs
from jaxllm.rl.losses import RLLossConfig, chunked_rl_sums, chunked_token_logprobs, grpo_advantages
from jaxllm.train.step import Objective


def loss_config(rl: RLConfig) -> RLLossConfig:
  return RLLossConfig(
    clip_low=rl.clip_low,
    clip_high=rl.clip_high,
    dual_clip=rl.dual_clip,
    correction=rl.correction,
    is_cap=None if rl.is_cap < 0 else rl.is_cap,
    kl_coef=rl.kl_coef,
    kl_estimator=rl.kl_estimator,
    kl_in=rl.kl_in,
    entropy_coef=rl.entropy_coef,
  )


def rl_objective(cfg: RLLossConfig, temperature: float = 1.0) -> Objective:
  """The train step's objective: the RL loss summed over completion tokens, divided once by the
  step's completion-token count (token-mean with a global denominator). The policy is the model's
  distribution at the rollouts' sampling temperature, softmax(logits / temperature): the one the
  samples were drawn from and whose log-probs the sampler reports (logprobs_mode="processed"), so the
  importance ratios compare like with like (veRL divides the actor's logits the same way). The
  per-token entropy of that policy is always computed (logged; a bonus only with entropy_coef).
  Head, log-probs, entropy and loss go chunk by chunk of model.loss_chunk positions (chunked_rl_sums).

  Works with gradient accumulation (make_train_step's grad_accum) as it is: every batch entry is per
  row, the loss and metrics are sums, and the step divides them once by count(batch) of the whole
  step, so accumulated gradients equal the unsplit step's."""

  def sums(mdef, params, batch):
    model = mdef.bind(params)
    h, aux, _ = model.hidden(batch["inputs"])
    loss_sum, metric_sums = chunked_rl_sums(h, model.head_weight(), batch, cfg, temperature, mdef.cfg.loss_chunk)
    return loss_sum, aux_loss(mdef.cfg, aux), {"loss": loss_sum, **metric_sums}

  return Objective(count=lambda b: jnp.sum(b["mask"].astype(jnp.float32)), sums=sums)


@functools.partial(jax.jit, static_argnames=("mdef", "temperature"))
def _token_logps(mdef, params, inputs, targets, temperature):
  model = mdef.bind(params)
  h, _, _ = model.hidden(inputs)
  if mdef.cfg.batch_invariant:  # the engine's arithmetic (sampling.sample_rows_invariant): bit-equal log-probs
    B, T, D = h.shape
    logps = invariant.head_logprobs(h.reshape(B * T, D), model.head_weight(), targets.reshape(B * T), temperature)
    return logps.reshape(B, T)
  return chunked_token_logprobs(h, model.head_weight(), targets, temperature, mdef.cfg.loss_chunk)


def token_logps(mdef, params, batch, hook_kwargs: dict | None = None, temperature: float = 1.0, mesh=None, plan=None):
  """Log-probs [B, T] of the targets under `params` at `temperature` (no gradient): the proximal or
  reference policy, or the behaviour log-probs recomputed by the learner (rl.behaviour_logprobs).
  Chunk by chunk of model.loss_chunk positions: never the [B, T, V] fp32 logits. Under
  model.batch_invariant on a mesh of several devices (mesh, plan), per device as the engine's steps
  run there (jaxllm.parallel.invariant_tp), with the [B, T, V] logits the engine's arithmetic needs."""
  if mdef.cfg.batch_invariant and mesh is not None and mesh.size > 1:
    key = (mdef, mesh, plan.cfg, float(temperature))
    if key not in _MANUAL:
      _MANUAL[key] = jax.jit(functools.partial(learner_logprobs, mdef, mesh, plan, temperature=float(temperature)))
    return _MANUAL[key](params, batch["inputs"], batch["targets"])
  with hooks.using(**(hook_kwargs or {})):
    return _token_logps(mdef, params, batch["inputs"], batch["targets"], float(temperature))


_MANUAL: dict = {}  # the jitted per-device log-prob passes (a mesh plan holds dicts: keyed by its config)


def rollout_len(samples) -> int:
  """T of a rollout's batch: its longest prompt + completion, rounded up to a power of two (few
  compiled shapes). A function of the samples alone, so the generation thread and the learner build
  the same batch, and short completions under a long rl.max_new_tokens do not pay for the limit."""
  return pow2_bucket(max(len(s.prompt_ids) + len(s.completion_ids) for s in samples), 16)


def build_batch(samples, advantages, T: int) -> dict:
  """Numpy [B, T] arrays of a rollout (see the module docstring)."""
  B = len(samples)
  inputs, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  mask, logp_behav = np.zeros((B, T), np.float32), np.zeros((B, T), np.float32)
  for i, s in enumerate(samples):
    seq = (list(s.prompt_ids) + list(s.completion_ids))[: T + 1]
    n = len(seq)
    inputs[i, : n - 1], targets[i, : n - 1] = seq[:-1], seq[1:]
    start = len(s.prompt_ids) - 1  # target index of the first completion token
    k = min(len(s.completion_ids), T - start)
    mask[i, start : start + k] = 1.0
    logp_behav[i, start : start + k] = s.logprobs[:k]
  adv = np.repeat(np.asarray(advantages, np.float32)[:, None], T, axis=1)
  return {"inputs": inputs, "targets": targets, "mask": mask, "logp_behav": logp_behav, "advantages": adv}


def advantages_of(rewards, group_size: int, normalize_std: bool, kl_penalty=None) -> np.ndarray:
  """GRPO advantages of the task rewards [B] (grpo_advantages), minus the KL penalty after the
  normalisation (rl.kl_in="reward"; the order of OpenRLHF and AReaL).

  kl_penalty [B]: each sample's penalty summed over its tokens -> advantages [B]. kl_penalty [B, T]:
  per token (kl_reward_penalty: zero off the mask) -> [B, T], each token's advantage minus the penalty
  from that token on (reward-to-go; the penalties before a token do not depend on it, so dropping them
  leaves the expected gradient unchanged, with less variance). Subtracting before the normalisation
  would let the KL set the scale: in a group whose task rewards are all equal the std is the KL's own
  spread, and the KL divided by it gives unit-size advantages whatever kl_coef is. After it, the
  penalty stays kl_coef-sized and REINFORCE on the k1 penalty is the exact reverse-KL gradient.
  """
  adv = np.asarray(grpo_advantages(jnp.asarray(rewards, jnp.float32), group_size, normalize_std))
  if kl_penalty is None:
    return adv
  pen = np.asarray(kl_penalty, np.float32)
  if pen.ndim == 1:
    return adv - pen
  to_go = np.flip(np.cumsum(np.flip(pen, 1), 1), 1)
  return adv[:, None] - to_go


def minibatch_rows(rl: RLConfig, grad_accum: int, dp: int) -> int:
  """Rows of one optimizer step (a minibatch of whole groups), checked to split into train.grad_accum
  accumulation chunks of a multiple of mesh.dp rows each (raises ConfigError naming the settings)."""
  rows = rl.prompts_per_step * rl.group_size // rl.minibatches
  if rows % (grad_accum * dp):
    raise ConfigError(
      f"an RL optimizer step holds rl.prompts_per_step * rl.group_size / rl.minibatches = {rows} samples, "
      f"which must split into train.grad_accum={grad_accum} chunks of a multiple of mesh.dp={dp} samples; "
      f"change train.grad_accum, rl.minibatches or rl.prompts_per_step"
    )
  return rows


# rl.* settings the rollouts saved with a checkpoint (generated ahead of the learner) were made with.
_ROLLOUT_SETTINGS = ("group_size", "prompts_per_step", "temperature")


def check_resume(saved_rl: dict, rl: RLConfig, pending=()) -> None:
  """Raise ConfigError when resuming with rl.* settings the checkpoint's saved state cannot serve.

  saved_rl: the rl section of the checkpoint's config (meta["config"]["rl"]); pending: the rollouts
  saved with it (jaxllm.rl.rollout.Rollout: .step, .version, the oldest weight version of its
  samples). Those were generated before the kill by versions the checkpoint no longer holds, so they
  must still be consumable as they are: each at most rl.eta versions stale at its step, groups of
  rl.group_size, rl.prompts_per_step prompts, sampled at rl.temperature (the learner's log-probs use
  it), completions no longer than rl.max_new_tokens allows (longer ones would be cut). Settings the
  learner applies afresh each step (the loss, rewards, optimizer) may change; so may these when
  nothing is pending.
  """
  if not pending:
    return
  n = len(pending)
  stale = max((int(r.step) - int(r.version) for r in pending if r.version is not None), default=0)
  if stale > rl.eta:
    raise ConfigError(
      f"rl.eta={rl.eta} is below what the checkpoint's {n} pending rollouts need: one is {stale} weight "
      f"versions stale at its step (generated under rl.eta={saved_rl.get('eta', '?')}); resume with "
      f"rl.eta>={stale}, or start a fresh run in another train.out_dir"
    )
  defaults = RLConfig()
  for key in _ROLLOUT_SETTINGS:
    old = saved_rl.get(key, getattr(defaults, key))
    if getattr(rl, key) != old:
      raise ConfigError(
        f"rl.{key}={getattr(rl, key)!r} but the checkpoint's {n} pending rollouts were generated with "
        f"rl.{key}={old!r}; resume with rl.{key}={old!r}, or start a fresh run in another train.out_dir"
      )
  old = saved_rl.get("max_new_tokens", defaults.max_new_tokens)
  if rl.max_new_tokens < old:
    raise ConfigError(
      f"rl.max_new_tokens={rl.max_new_tokens} is below the checkpoint's {old}, with which its {n} pending "
      f"rollouts were generated (their completions would be cut); resume with rl.max_new_tokens>={old}"
    )
