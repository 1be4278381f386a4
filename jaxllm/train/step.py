"""Loss and the jitted train step over pure pytrees: TrainState(params, opt_state, step).

The step is jitted with the state donated and its output shardings pinned to the input shardings
(otherwise XLA may choose others and the next call would reshard). Gradient accumulation scans
over micro-batches and averages.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.model import hooks
from jaxllm.model.params import ModelDef
from jaxllm.model.transformer import aux_loss


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: jax.Array   # int32 scalar, optimizer steps taken


def cross_entropy(logits, targets, mask=None):
  """Mean token cross-entropy. logits [B, T, V] fp32; targets [B, T]; mask [B, T] (1 = counts)."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = logz - picked
  if mask is None:
    return jnp.mean(nll)
  mask = mask.astype(nll.dtype)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss_fn(mdef: ModelDef, params, batch):
  """-> (total loss, metrics). batch: inputs, targets [B, T] int32, optional mask [B, T]."""
  out = mdef.bind(params)(batch["inputs"])
  ce = cross_entropy(out.logits, batch["targets"], batch.get("mask"))
  aux = aux_loss(mdef.cfg, out.aux)
  return ce + aux, {"loss": ce, "aux_loss": aux}


def grads_and_metrics(mdef: ModelDef, params, batch, grad_accum: int = 1, loss=loss_fn):
  """Average gradients over `grad_accum` equal micro-batches (split along the batch dim)."""
  grad_fn = jax.value_and_grad(lambda p, b: loss(mdef, p, b), has_aux=True)
  if grad_accum == 1:
    (_, metrics), grads = grad_fn(params, batch)
    return grads, metrics
  # Strided chunks (row i -> chunk i % grad_accum) keep each dp shard's rows local; a contiguous
  # split would move rows between dp ranks.
  micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1),
                       batch)

  def body(acc, mb):
    (_, m), g = grad_fn(params, mb)
    return jax.tree.map(jnp.add, acc, (g, m)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  m0 = {"loss": jnp.float32(0), "aux_loss": jnp.float32(0)}
  (grads, metrics), _ = jax.lax.scan(body, (zeros, m0), micro)
  return jax.tree.map(lambda x: x / grad_accum, (grads, metrics))


def make_train_step(mdef: ModelDef, tx: optax.GradientTransformation, state_shardings=None,
                    batch_sharding=None, grad_accum: int = 1, hook_kwargs: dict | None = None,
                    grads_fn=None):
  """Jitted (state, batch) -> (state, metrics). `hook_kwargs` installs mesh hooks while tracing;
  `grads_fn(params, batch) -> (grads, metrics)` replaces the default (the pipeline uses this)."""
  grads_fn = grads_fn or (lambda p, b: grads_and_metrics(mdef, p, b, grad_accum))

  def step(state: TrainState, batch):
    with hooks.using(**(hook_kwargs or {})):
      grads, metrics = grads_fn(state.params, batch)
    metrics["grad_norm"] = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    # A non-finite step is not applied: the state stays the last good one and the loop stops.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (params, opt_state), (state.params, state.opt_state))
    metrics["finite"] = finite
    return TrainState(new[0], new[1], state.step + finite.astype(jnp.int32)), metrics

  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)
