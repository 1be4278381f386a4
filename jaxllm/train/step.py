"""Loss, gradients and the jitted train step over pure pytrees: TrainState(params, opt_state, step).

One loss and one gradient-accumulation path serve every mesh. The forward is the model's own
(`hidden`), or the circular pipeline's (`jaxllm.parallel.pipeline.pipeline_hidden`, see `pipelined`);
the head and the loss are the same for both. The masked cross-entropy is normalised once per step by
the step's token count: each accumulation chunk contributes its token-loss *sum* divided by that
global count, so uneven masks give the same loss and gradients accumulated or not (Megatron and
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

import functools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.model import hooks
from jaxllm.model.loss import cross_entropy_sums, token_count
from jaxllm.model.params import ModelDef
from jaxllm.model.transformer import aux_loss
from jaxllm.parallel.pipeline import pipeline_hidden

# forward(params, tokens [B, T]) -> (final hidden [B, T, D], aux dict); None = the model's own.
Forward = Callable[[Any, jax.Array], tuple]


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: jax.Array   # int32 scalar, optimizer steps taken


def pipelined(mdef: ModelDef, mesh, plan, microbatches: int, remat: bool = True) -> Forward:
  """The circular-pipeline forward for `forward=` (pp > 1 meshes)."""
  return functools.partial(pipeline_hidden, mdef, mesh=mesh, plan=plan, microbatches=microbatches,
                           remat=remat)


def loss_sums(mdef: ModelDef, params, batch, forward: Forward | None = None):
  """-> (sum of token NLLs, counted tokens, aux loss) of one batch: inputs, targets [B, T] int32,
  optional mask [B, T] (1 = counts)."""
  model = mdef.bind(params)
  if forward is None:
    h, aux, _ = model.hidden(batch["inputs"])
  else:
    h, aux = forward(params, batch["inputs"])
  nll, count = cross_entropy_sums(model.logits(h), batch["targets"], batch.get("mask"))
  return nll, count, aux_loss(mdef.cfg, aux)


@dataclass(frozen=True)
class Objective:
  """What a train step minimises. count(batch) -> the step's counted tokens (the one denominator);
  sums(mdef, params, batch, forward) -> (loss sum over counted tokens, aux loss (a per-chunk mean),
  {metric name: sum over counted tokens}); the step reports each metric sum / count."""
  count: Callable
  sums: Callable


def _lm_sums(mdef, params, batch, forward):
  nll, _, aux = loss_sums(mdef, params, batch, forward)
  return nll, aux, {"loss": nll}


LM = Objective(count=lambda b: token_count(b["targets"], b.get("mask")), sums=_lm_sums)


def grads_and_metrics(mdef: ModelDef, params, batch, grad_accum: int = 1, forward: Forward | None = None,
                      objective: Objective = LM):
  """Gradients of (objective sum / the batch's counted tokens + aux loss), accumulated over
  `grad_accum` chunks. -> (grads, {each objective metric (per token), 'aux_loss', 'tokens'}); for the
  LM objective 'loss' is the CE mean."""
  denom = jnp.maximum(objective.count(batch), 1.0)

  def chunk_loss(p, b):
    total, aux, sums = objective.sums(mdef, p, b, forward)
    return total / denom + aux / grad_accum, {**sums, "aux_loss": aux / grad_accum}
  grad_fn = jax.value_and_grad(chunk_loss, has_aux=True)
  if grad_accum == 1:
    (_, sums), grads = grad_fn(params, batch)
  else:
    # Strided chunks (row i -> chunk i % grad_accum) keep each dp shard's rows local; a contiguous
    # split would move rows between dp ranks.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]),
                                                0, 1), batch)

    def body(acc, mb):
      (_, s), g = grad_fn(params, mb)
      return jax.tree.map(jnp.add, acc, (g, s)), None
    shapes = jax.eval_shape(lambda: chunk_loss(params, jax.tree.map(lambda x: x[0], micro))[1])
    zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes))
    (grads, sums), _ = jax.lax.scan(body, zeros, micro)
  metrics = {k: v / denom for k, v in sums.items() if k != "aux_loss"}
  return grads, {**metrics, "aux_loss": sums["aux_loss"], "tokens": denom}


def make_train_step(mdef: ModelDef, tx: optax.GradientTransformation, state_shardings=None,
                    batch_sharding=None, grad_accum: int = 1, hook_kwargs: dict | None = None,
                    forward: Forward | None = None, objective: Objective = LM):
  """Jitted (state, batch) -> (state, metrics). `hook_kwargs` installs mesh hooks while tracing;
  `forward` replaces the model's own forward (the pipeline, see `pipelined`); `objective` the loss."""
  def step(state: TrainState, batch):
    with hooks.using(**(hook_kwargs or {})):
      grads, metrics = grads_and_metrics(mdef, state.params, batch, grad_accum, forward, objective)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
    # A non-finite step is not applied: the state stays the last good one and the loop stops.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (params, opt_state), (state.params, state.opt_state))
    metrics["finite"] = finite
    return TrainState(new[0], new[1], state.step + finite.astype(jnp.int32)), metrics

  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def make_eval_step(mdef: ModelDef, params_shardings=None, batch_sharding=None, hook_kwargs: dict | None = None,
                   forward: Forward | None = None):
  """Jitted (params, batch) -> (sum of token NLLs, counted tokens): add over eval batches, divide once."""
  def ev(params, batch):
    with hooks.using(**(hook_kwargs or {})):
      nll, count, _ = loss_sums(mdef, params, batch, forward)
    return nll, count
  if params_shardings is None:
    return jax.jit(ev)
  return jax.jit(ev, in_shardings=(params_shardings, batch_sharding))
