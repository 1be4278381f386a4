"""Loss, gradients and the jitted train step over pure pytrees: TrainState(params, opt_state, step).

One loss and one gradient-accumulation path serve every mesh. With pipeline stages (pp > 1) the
language-model loss and its gradients come from `jaxllm.parallel.pipeline.Pipeline` (head and loss
on the last stage, GPipe or 1F1B schedule); otherwise from the model's own forward. The masked
cross-entropy is normalised once per step by the step's token count: each accumulation chunk
contributes its token-loss *sum* divided by that global count, so uneven masks give the same loss and
gradients accumulated or not (Megatron and
MaxText do the same). MoE aux losses are per chunk and averaged over chunks (as Megatron does for
microbatches).

The objective is pluggable (`Objective`): the language-model loss by default; the RL learner passes
its policy-gradient objective (jaxllm.rl), so RL trains with this same step, mesh, sharding and
checkpoints. An objective reports sums over the step's counted tokens; the step divides once.

The step is jitted with the state donated and its output shardings pinned to the input shardings
(otherwise XLA may choose others and the next call would reshard).

Shapes: the package legend in jaxllm/__init__.py (B, T, D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import ConfigError
from jaxllm.model import hooks
from jaxllm.model.loss import chunked_cross_entropy_sums, token_count
from jaxllm.model.params import ModelDef
from jaxllm.model.transformer import aux_loss
from jaxllm.parallel.pipeline import Pipeline


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: jax.Array  # int32 scalar, optimizer steps taken


def loss_sums(mdef: ModelDef, params, batch, pipeline: Pipeline | None = None):
  """-> (sum of token NLLs, counted tokens, aux loss) of one batch: inputs, targets [B, T] int32,
  optional mask [B, T] (1 = counts), segment_ids and positions [B, T] int32 (packed documents)."""
  count = token_count(batch["targets"], batch.get("mask"))
  if pipeline is not None:
    nll, aux = pipeline.sums(params, batch)
    return nll, count, aux_loss(mdef.cfg, aux)
  model = mdef.bind(params)
  h, aux, _ = model.hidden(batch["inputs"], batch.get("positions"), segment_ids=batch.get("segment_ids"))
  # The head and the loss chunk by chunk of positions (model.loss_chunk): never the [B, T, V] fp32 logits.
  nll, _ = chunked_cross_entropy_sums(h, model.head_weight(), batch["targets"], batch.get("mask"), mdef.cfg.loss_chunk)
  return nll, count, aux_loss(mdef.cfg, aux)


@dataclass(frozen=True)
class Objective:
  """What a train step minimises. count(batch) -> the step's counted tokens (the one denominator);
  sums(mdef, params, batch) -> (loss sum over counted tokens, aux loss (a per-chunk mean),
  {metric name: sum over counted tokens}); the step reports each metric sum / count."""

  count: Callable
  sums: Callable


def _lm_sums(mdef, params, batch):
  nll, _, aux = loss_sums(mdef, params, batch)
  return nll, aux, {"loss": nll}


LM = Objective(count=lambda b: token_count(b["targets"], b.get("mask")), sums=_lm_sums)


def grads_and_metrics(
  mdef: ModelDef, params, batch, grad_accum: int = 1, pipeline: Pipeline | None = None, objective: Objective = LM
):
  """Gradients of (objective sum / the batch's counted tokens + aux loss), accumulated over
  `grad_accum` chunks. -> (grads, {each objective metric (per token), 'aux_loss', 'tokens'}); for the
  LM objective 'loss' is the CE mean. With a `pipeline` (pp > 1) params have "layers" in its layout."""
  denom = jnp.maximum(objective.count(batch), 1.0)
  if pipeline is not None and objective is not LM:
    raise ConfigError(
      "pipeline parallelism (mesh.pp > 1) trains the language-model objective only; "
      "use mesh.pp=1 for RL and reward-model training"
    )

  def chunk_loss(p, b):
    total, aux, sums = objective.sums(mdef, p, b)
    return total / denom + aux / grad_accum, {**sums, "aux_loss": aux / grad_accum}

  def grad_fn(p, b):
    if pipeline is None:
      (_, sums), g = jax.value_and_grad(chunk_loss, has_aux=True)(p, b)
      return g, sums
    g, nll, aux = pipeline.value_and_grad(p, b, 1.0 / denom, 1.0 / grad_accum)
    return g, {"loss": nll, "aux_loss": aux_loss(mdef.cfg, aux) / grad_accum}

  if grad_accum == 1:
    grads, sums = grad_fn(params, batch)
  else:
    # Strided chunks (row i -> chunk i % grad_accum) keep each dp shard's rows local; a contiguous
    # split would move rows between dp ranks.
    micro = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1), batch
    )

    def body(acc, mb):
      return jax.tree.map(jnp.add, acc, grad_fn(params, mb)), None

    zeros = jax.tree.map(
      lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    )
    (grads, sums), _ = jax.lax.scan(body, zeros, micro)
  metrics = {k: v / denom for k, v in sums.items() if k != "aux_loss"}
  return grads, {**metrics, "aux_loss": sums["aux_loss"], "tokens": denom}


def make_train_step(
  mdef: ModelDef,
  tx: optax.GradientTransformation,
  state_shardings=None,
  batch_sharding=None,
  grad_accum: int = 1,
  hook_kwargs: dict | None = None,
  pipeline: Pipeline | None = None,
  objective: Objective = LM,
):
  """Jitted (state, batch) -> (state, metrics). `hook_kwargs` installs mesh hooks while tracing;
  `pipeline` computes the loss and gradients through pipeline stages; `objective` the loss."""
  if mdef.cfg.batch_invariant:
    raise ConfigError(
      "model.batch_invariant=true makes forward passes batch invariant (serving with serve.deterministic, "
      "and RL's log-prob passes in train.py rl, whose updates take the ordinary arithmetic); a training "
      "step's gradient cannot go through it. Turn model.batch_invariant off for this run"
    )

  def step(state: TrainState, batch):
    with hooks.using(**(hook_kwargs or {})):
      grads, metrics = grads_and_metrics(mdef, state.params, batch, grad_accum, pipeline, objective)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Finite loss and gradients, and an update that did not overflow the parameters (a huge learning
    # rate can turn finite gradients into inf weights, which a checkpoint must never hold).
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves((metrics, params))]))
    # A non-finite step is not applied: the state stays the last good one and the loop stops.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (params, opt_state), (state.params, state.opt_state))
    metrics["finite"] = finite
    return TrainState(new[0], new[1], state.step + finite.astype(jnp.int32)), metrics

  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(
    step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None), donate_argnums=0
  )


def make_eval_step(
  mdef: ModelDef,
  params_shardings=None,
  batch_sharding=None,
  hook_kwargs: dict | None = None,
  pipeline: Pipeline | None = None,
):
  """Jitted (params, batch) -> (sum of token NLLs, counted tokens): add over eval batches, divide once."""

  def ev(params, batch):
    with hooks.using(**(hook_kwargs or {})):
      nll, count, _ = loss_sums(mdef, params, batch, pipeline)
    return nll, count

  if params_shardings is None:
    return jax.jit(ev)
  return jax.jit(ev, in_shardings=(params_shardings, batch_sharding))
