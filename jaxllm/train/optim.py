"""AdamW with linear warmup + cosine decay, global-norm clipping, decay on matrices only."""
from __future__ import annotations

import jax
import optax

from jaxllm.config import TrainConfig


def lr_schedule(cfg: TrainConfig):
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=cfg.lr, warmup_steps=max(cfg.warmup_steps, 1),
    decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  # Norm weights and biases (ndim <= 2 with a stacked layer axis counts as a vector) are not decayed.
  def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 3 or (p.ndim == 2 and p.shape[0] > 1024), params)

  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)
