"""AdamW with linear warmup + cosine decay, global-norm clipping, and weight decay chosen by each
parameter's logical axes.

Decay: a parameter is a weight matrix, and decayed, when it maps the residual stream (`embed` axis)
to or from another feature axis: q/k/v/o, MLP and expert matrices, the router, the token embedding
and the output head. Norm scales and biases have no such pair of axes and are never decayed, nor is
the shared-expert gate, a [D] vector. Embeddings and the head are decayed as Megatron-LM and nanoGPT
do (Megatron's default exempts only biases and 1-D parameters). The stacking axes (`layers`, `exp`)
do not count, so the choice depends on what a parameter is, never on its size.

Schedule: warmup to `lr`, then cosine to `lr * min_lr_ratio` at `decay_steps`, flat after it. The
horizon is a key of its own (resolved to `steps` when a run starts and saved with it), so a run
resumed with a larger `steps` continues from the learning rate it stopped at instead of jumping.
"""

from __future__ import annotations

import jax
import optax

from jaxllm.config import TrainConfig

# Stacking axes: several independent parameters of the same kind, not a feature dimension.
STACK_AXES = ("layers", "exp")


def is_decayed(names: tuple) -> bool:
  """Weight decay for a parameter with these logical axis names (see the module docstring)."""
  features = [n for n in names if n not in STACK_AXES]
  return "embed" in features and len(features) >= 2


def decay_mask(logical: dict) -> dict:
  """Same tree as the params (ModelDef.logical): True where the parameter is decayed."""
  return jax.tree.map(is_decayed, logical, is_leaf=lambda x: isinstance(x, tuple))


def lr_schedule(cfg: TrainConfig):
  horizon = cfg.decay_steps or cfg.steps
  if cfg.warmup_steps == 0:  # no warmup: the first step already uses the peak (warmup_cosine would give 0)
    return optax.cosine_decay_schedule(cfg.lr, decay_steps=max(horizon, 1), alpha=cfg.min_lr_ratio)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=max(cfg.warmup_steps, 1),
    decay_steps=max(horizon, cfg.warmup_steps + 1),
    end_value=cfg.lr * cfg.min_lr_ratio,
  )


def make_optimizer(cfg: TrainConfig, logical: dict) -> optax.GradientTransformation:
  """`logical`: the model's logical axis names per parameter (jaxllm.model.params.ModelDef.logical)."""
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(
    optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask(logical))
  )
  return optax.chain(*parts)
