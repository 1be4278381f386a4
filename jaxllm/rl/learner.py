"""The learner: jaxllm.train's one train step with an RL objective (same mesh, sharding, optimizer and
checkpoints as pretraining), and the batch it consumes.

A rollout becomes [B, T] arrays: inputs/targets are prompt + completion shifted by one, `mask` is 1
on the targets that are completion tokens, `logp_behav` holds the sampler's log-probs there, and
`advantages` the sample's GRPO advantage on every token. Before the update the learner adds
`logp_prox` (its own log-probs under the weights it is about to update; decoupled PPO's proximal
policy) and, with a KL term, `logp_ref` (the frozen reference's), each one no-grad forward pass.

Shapes: the package legend in jaxllm/__init__.py (B samples, T tokens, V).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.buckets import pow2_bucket
from jaxllm.config import RLConfig
from jaxllm.model import hooks
from jaxllm.model.transformer import aux_loss
from jaxllm.rl.losses import RLLossConfig, grpo_advantages, rl_loss, token_entropy, token_logprobs
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
  per-token entropy of that policy is always computed (logged; a bonus only with entropy_coef)."""

  def sums(mdef, params, batch):
    model = mdef.bind(params)
    h, aux, _ = model.hidden(batch["inputs"])
    logits = model.logits(h).astype(jnp.float32) / temperature
    b = dict(batch, entropy=token_entropy(logits))
    loss_sum, _, metric_sums, _ = rl_loss(token_logprobs(logits, batch["targets"]), b, cfg)
    return loss_sum, aux_loss(mdef.cfg, aux), {"loss": loss_sum, **metric_sums}

  return Objective(count=lambda b: jnp.sum(b["mask"].astype(jnp.float32)), sums=sums)


@functools.partial(jax.jit, static_argnames=("mdef", "temperature"))
def _token_logps(mdef, params, inputs, targets, temperature):
  return token_logprobs(mdef.bind(params)(inputs).logits.astype(jnp.float32) / temperature, targets)


def token_logps(mdef, params, batch, hook_kwargs: dict | None = None, temperature: float = 1.0):
  """Log-probs [B, T] of the targets under `params` at `temperature` (no gradient): the proximal or
  reference policy, or the behaviour log-probs recomputed by the learner (rl.behaviour_logprobs)."""
  with hooks.using(**(hook_kwargs or {})):
    return _token_logps(mdef, params, batch["inputs"], batch["targets"], float(temperature))


def rollout_len(samples, max_new_tokens: int) -> int:
  """T of a rollout's batch: a power of two (few compiled shapes), the same in the generation
  thread and the learner so their forward passes are the same computation."""
  return pow2_bucket(max(len(s.prompt_ids) + max_new_tokens for s in samples), 16)


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


def advantages_of(rewards, group_size: int, normalize_std: bool) -> np.ndarray:
  return np.asarray(grpo_advantages(jnp.asarray(rewards, jnp.float32), group_size, normalize_std))
