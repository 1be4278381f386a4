"""Circular pipeline with virtual stages (PP x vPP) inside `shard_map`.

Megatron-LM's interleaved schedule (Narayanan et al., SC'21) puts `vpp` non-adjacent chunks of
`C = L/(pp*vpp)` layers on each of `pp` stages: layer `l` lives on stage `(l // C) % pp`, repeat
`l // (C*pp)`. Run as a circular pipeline (as in GSPMD/Praxis and MaxText): every tick each stage
runs one chunk on one microbatch and `ppermute`s the result to the next stage; the last stage's
output wraps around to stage 0, which runs it through its next chunk. Stage `s` at tick `t` works
on item `k = t - s` (repeat `k // m`, microbatch `k % m`), so with `m >= pp` microbatches the
circulated output of item `k` is back at stage 0 by tick `k + m`. The schedule takes
`T = m*vpp + pp - 1` ticks and idles `(pp-1)/T` of them (the bubble), against `(pp-1)/(m+pp-1)`
without virtual stages.

Only the decoder blocks are pipelined; the embedding, final norm, head and loss run in the
auto-sharded part of the step (replicated over the stage axis). The shard_map is manual over the
stage axis only, so dp/tp/ep sharding inside a stage stays automatic (GSPMD), and the backward pass
is plain autodiff through the scan over ticks. With `remat=True` each tick saves only its stage
input; the stage is recomputed in the backward pass, so activation memory grows by one [b, T, D]
per tick instead of every layer's intermediates.

Parameters and checkpoints stay canonical ([L, ...] in model order); `to_pipeline_layout` is a
reshape/transpose computed inside the step and constrained onto the stage axis.

Legend: B batch, b microbatch, m microbatches, T sequence, D model, L layers, C layers per chunk.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.config import ConfigError
from jaxllm.model import hooks
from jaxllm.model import layers as ops
from jaxllm.model.params import ModelDef
from jaxllm.model.transformer import aux_loss, block_forward, remat as remat_layer
from jaxllm.parallel.mesh import MeshPlan
from jaxllm.parallel.sharding import logical_spec
from jaxllm.train.state import batch_sharding, param_shardings, state_shardings
from jaxllm.train.step import cross_entropy

STAGE = "pp"   # the stage mesh axis (jaxllm.parallel.mesh always names it so)


# ---------------------------------------------------------------------------------------------
# Schedule accounting and validation

def check_pipeline(n_layers: int, pp: int, vpp: int, m: int) -> None:
  """Raise ConfigError unless `n_layers` splits into pp*vpp equal chunks and m >= pp."""
  if min(pp, vpp, m) < 1:
    raise ConfigError(f"pipeline sizes must be >= 1, got pp={pp} vpp={vpp} microbatches={m}")
  if n_layers % (pp * vpp):
    ok = [v for v in range(1, n_layers + 1) if n_layers % (pp * v) == 0]
    raise ConfigError(f"model.n_layers={n_layers} must be divisible by mesh.pp*mesh.vpp={pp}*{vpp}; "
                      f"with pp={pp} use vpp in {ok}" if ok else
                      f"model.n_layers={n_layers} must be divisible by mesh.pp*mesh.vpp={pp}*{vpp}; "
                      f"pick pp among the divisors of {n_layers}")
  if pp > 1 and m < pp:
    raise ConfigError(f"mesh.microbatches={m} must be >= mesh.pp={pp}: the circular schedule needs the "
                      f"last stage's output of microbatch i back at stage 0 before it is due; raise "
                      f"microbatches to at least {pp}")


def schedule_info(pp: int, vpp: int, m: int) -> dict:
  """Tick accounting of the circular schedule: ticks, (stage, tick) slots, valid ones, bubble."""
  ticks = m * vpp + pp - 1
  slots = ticks * pp
  valid = m * vpp * pp
  return {"pp": pp, "vpp": vpp, "microbatches": m, "ticks": ticks, "slots": slots,
          "valid_slots": valid, "bubble": (pp - 1) / ticks,
          "bubble_no_vpp": (pp - 1) / (m + pp - 1)}


def format_schedule(pp: int, vpp: int, m: int) -> str:
  """One startup line, e.g. `pipeline pp=2 vpp=2 m=4: 9 ticks, 16/18 slots valid, bubble 11.1%`."""
  s = schedule_info(pp, vpp, m)
  return (f"pipeline pp={pp} vpp={vpp} m={m}: {s['ticks']} ticks, {s['valid_slots']}/{s['slots']} "
          f"stage-slots valid, bubble {100 * s['bubble']:.1f}% (vpp=1 would be "
          f"{100 * s['bubble_no_vpp']:.1f}%)")


def stage_of_layer(layer: int, n_layers: int, pp: int, vpp: int) -> tuple[int, int, int]:
  """Megatron placement of canonical layer `layer` -> (repeat, stage, index in chunk)."""
  C = n_layers // (pp * vpp)
  return layer // (C * pp), (layer // C) % pp, layer % C


# ---------------------------------------------------------------------------------------------
# Layout: canonical [L, ...] <-> pipeline [vpp, pp, C, ...]

def to_pipeline_layout(stacked, pp: int, vpp: int):
  """Canonical [L, ...] leaves -> [vpp, pp, C, ...]; element [r, s, c] is layer (r*pp + s)*C + c,
  which is exactly Megatron's placement (a plain reshape, because repeats are outermost)."""
  def one(x):
    L = x.shape[0]
    if L % (pp * vpp):
      raise ConfigError(f"{L} layers do not split into pp*vpp={pp}*{vpp} equal chunks")
    return x.reshape(vpp, pp, L // (pp * vpp), *x.shape[1:])
  return jax.tree.map(one, stacked)


def from_pipeline_layout(staged):
  """[vpp, pp, C, ...] leaves -> canonical [L, ...] in model order."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1] * x.shape[2], *x.shape[3:]), staged)


def layer_shardings(mdef: ModelDef, mesh, plan: MeshPlan, pipeline: bool = False) -> dict:
  """NamedShardings of the stacked layer params: canonical [L, ...] with L split over the stage axis
  (contiguous blocks: exactly the stage placement when vpp == 1), or, with `pipeline=True`, of the
  [vpp, pp, C, ...] view with its pp dim on the stage axis. Other dims follow the logical rules."""
  abstract = mdef.abstract_params()["layers"]

  def one(names, a):
    inner = tuple(logical_spec(plan, names[1:], a.shape[1:]))
    stage = STAGE if plan.cfg.pp > 1 else None
    return NamedSharding(mesh, P(None, stage, None, *inner) if pipeline else P(stage, *inner))
  return jax.tree.map(one, mdef.logical["layers"], abstract, is_leaf=lambda x: isinstance(x, tuple))


def pipeline_param_shardings(mdef: ModelDef, mesh, plan: MeshPlan) -> dict:
  """Shardings for the canonical params of a pipelined run: like train.state.param_shardings but
  the layer stack split over the stage axis, so each stage keeps (and updates) only its own layers
  when vpp == 1. With vpp > 1 a stage's chunks are not one contiguous block of [L], so the step
  moves the weights into place once per step (an all-to-all over the stage axis, not an
  all-gather) and the gradients back; the per-microbatch traffic is only the ppermutes."""
  out = dict(param_shardings(mdef, mesh, plan))
  out["layers"] = layer_shardings(mdef, mesh, plan)
  return out


def pipeline_state_shardings(mdef: ModelDef, tx, mesh, plan: MeshPlan):
  """TrainState shardings for a pipelined run: the parameters and their optimizer moments take
  pipeline_param_shardings (layer stack split over the stage axis)."""
  return state_shardings(mdef, tx, mesh, plan, params=pipeline_param_shardings(mdef, mesh, plan))


# ---------------------------------------------------------------------------------------------
# The pipelined decoder stack

def _chunk(cfg, chunk_params, x, cos, sin, layer_remat: str = "none"):
  """Run the C layers of one chunk. x [b, T, D] -> (x, {aux name: sum over the C layers})."""
  def body(x, p):
    x, _, aux = block_forward(cfg, p, x, cos, sin, None, 0)
    return x, aux
  x, aux = jax.lax.scan(remat_layer(body, layer_remat), x, chunk_params)
  return x, {k: jnp.sum(v) for k, v in aux.items()}


def pipeline_layers(cfg, staged, x, mesh, m: int, remat: bool = True):
  """Run all decoder blocks over microbatches with the circular schedule.

  staged: layer params in pipeline layout [vpp, pp, C, ...] (pp dim on the stage axis).
  x: [m, b, T, D] embedded microbatches. -> (y [m, b, T, D] after the last block, aux dict of the
  per-microbatch aux statistics averaged over layers and microbatches).
  """
  vpp, pp = jax.tree.leaves(staged)[0].shape[:2]
  L = vpp * pp * jax.tree.leaves(staged)[0].shape[2]
  check_pipeline(L, pp, vpp, m)
  ticks = m * vpp + pp - 1
  b, T = x.shape[1], x.shape[2]
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
  cos, sin = ops.rope_tables(positions, ops.rope_inv_freq(cfg))

  def stage_apply(w_all, r, x_in):
    # Indexing the chunk inside the remat region keeps the weights out of the per-tick residuals.
    w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False), w_all)
    # Without the tick-level remat, the model's own per-layer policy (model.remat) applies.
    return _chunk(cfg, w, x_in, cos, sin, "none" if remat else cfg.remat)
  if remat:
    stage_apply = jax.checkpoint(stage_apply, policy=jax.checkpoint_policies.nothing_saveable)

  def body(w_all, buf):
    # w_all: [vpp, C, ...] this stage's chunks; buf: [m, b, T, D] microbatches (replicated).
    s = jax.lax.axis_index(STAGE)
    vary = functools.partial(jax.lax.pcast, axis_name=(STAGE,), to="varying")
    aux_names = _aux_names(cfg)

    def tick(carry, t):
      recv, buf, outs, aux_acc = carry
      # Stage 0 banks the last stage's output of item t - pp (received now) in the slot of its
      # microbatch: that slot's previous content was consumed at tick t - pp.
      slot_in = jnp.mod(t - pp, m)
      keep = jax.lax.dynamic_index_in_dim(buf, slot_in, 0, keepdims=False)
      buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(t >= pp, recv, keep), slot_in, 0)
      x_in = jnp.where(s == 0, jax.lax.dynamic_index_in_dim(buf, jnp.mod(t, m), 0, keepdims=False), recv)
      k = t - s                                    # item this stage works on
      valid = (k >= 0) & (k < m * vpp)
      r = jnp.clip(k // m, 0, vpp - 1)
      j = jnp.mod(k, m)
      y, aux = stage_apply(w_all, r, x_in)
      # Only valid slots are written: final outputs (last stage, last repeat) and aux statistics.
      done = valid & (s == pp - 1) & (r == vpp - 1)
      old = jax.lax.dynamic_index_in_dim(outs, j, 0, keepdims=False)
      outs = jax.lax.dynamic_update_index_in_dim(outs, jnp.where(done, y, old), j, 0)
      aux_acc = {n: aux_acc[n] + jnp.where(valid, aux[n], 0.0) for n in aux_names}
      recv = jax.lax.ppermute(y, STAGE, [(i, (i + 1) % pp) for i in range(pp)])
      return (recv, buf, outs, aux_acc), None

    w_all = jax.tree.map(lambda a: a[:, 0], w_all)          # [vpp, 1, C, ...] -> [vpp, C, ...]
    zeros = vary(jnp.zeros_like(buf[0]))
    init = (zeros, vary(buf), vary(jnp.zeros_like(buf)), {n: vary(jnp.float32(0)) for n in aux_names})
    # Global sharding hooks don't apply inside shard_map. MoE layers take the local dropless path
    # (jaxllm.model.moe.local_experts), GSPMD-partitioned over the stage's ep devices: nesting the
    # all-to-all expert shard_map (jaxllm.parallel.moe) in this one fails to lower under Shardy
    # ("manual axis after free axis 'pp'"), as DESIGN.md records.
    with hooks.cleared():
      (_, _, outs, aux_acc), _ = jax.lax.scan(tick, init, jnp.arange(ticks, dtype=jnp.int32))
    # The final hidden states live on the last stage; summing over stages hands them to all.
    outs = jax.lax.psum(jnp.where(s == pp - 1, outs, 0.0), STAGE)
    aux = {n: jax.lax.psum(v, STAGE) / (L * m) for n, v in aux_acc.items()}
    return outs, aux

  fn = jax.shard_map(body, mesh=mesh, in_specs=(P(None, STAGE), P()), out_specs=(P(), P()),
                     axis_names={STAGE})
  return fn(staged, x)


def _aux_names(cfg) -> tuple[str, ...]:
  return ("load_balance", "router_z") if cfg.is_moe else ()


# ---------------------------------------------------------------------------------------------
# Loss and gradients (the train step's grads_fn)

def split_microbatches(x, m: int):
  """[B, ...] -> [m, B/m, ...] with microbatch i = rows i, m+i, 2m+i, ... (strided, so a batch dim
  sharded over dp stays sharded over dp inside every microbatch)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def merge_microbatches(x):
  """Inverse of split_microbatches: [m, b, ...] -> [m*b, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def pipeline_loss(mdef: ModelDef, params, batch, mesh, plan: MeshPlan, microbatches: int,
                  remat: bool = True):
  """Same contract as jaxllm.train.step.loss_fn: -> (ce + aux loss, {'loss', 'aux_loss'}).

  The CE is the mean over the whole batch (identical to the non-pipelined model); MoE aux losses
  are computed per microbatch and averaged, as Megatron does under pipelining."""
  cfg, pp, vpp, m = mdef.cfg, plan.cfg.pp, plan.cfg.vpp, microbatches
  B = batch["inputs"].shape[0]
  if B % m:
    raise ConfigError(f"batch of {B} sequences does not split into {m} microbatches; make the "
                      f"per-step batch (train.batch_size/train.grad_accum) a multiple of {m}")
  model = mdef.bind(params)
  x = split_microbatches(model.embed_tokens(batch["inputs"]), m)     # [m, b, T, D]
  staged = to_pipeline_layout(params["layers"], pp, vpp)
  staged = jax.lax.with_sharding_constraint(staged, layer_shardings(mdef, mesh, plan, pipeline=True))
  y, aux = pipeline_layers(cfg, staged, x, mesh, m, remat)
  h = ops.rms_norm(merge_microbatches(y), params["final_norm"], cfg.norm_eps)
  ce = cross_entropy(model.logits(h), batch["targets"], batch.get("mask"))
  a = aux_loss(cfg, aux)
  return ce + a, {"loss": ce, "aux_loss": a}


def make_pipeline_grads_fn(mdef: ModelDef, mesh, plan: MeshPlan, microbatches: int,
                           grad_accum: int = 1, remat: bool = True):
  """grads_fn(params, batch) -> (grads, metrics) for make_train_step(grads_fn=...): like
  jaxllm.train.step.grads_and_metrics, but the decoder blocks run as a circular pipeline."""
  check_pipeline(mdef.cfg.n_layers, plan.cfg.pp, plan.cfg.vpp, microbatches)
  loss = functools.partial(pipeline_loss, mesh=mesh, plan=plan, microbatches=microbatches, remat=remat)
  grad_fn = jax.value_and_grad(lambda p, b: loss(mdef, p, b), has_aux=True)

  def grads_fn(params, batch):
    if grad_accum == 1:
      (_, metrics), grads = grad_fn(params, batch)
      return grads, metrics
    # Strided chunks (row i goes to chunk i % grad_accum) keep the dp-sharded batch dim local; a
    # contiguous split, as grads_and_metrics does, would all-gather the tokens across dp.
    micro = jax.tree.map(lambda x: split_microbatches(x, grad_accum), batch)

    def body(acc, mb):
      (_, met), g = grad_fn(params, mb)
      return jax.tree.map(jnp.add, acc, (g, met)), None
    zeros = (jax.tree.map(jnp.zeros_like, params), {"loss": jnp.float32(0), "aux_loss": jnp.float32(0)})
    (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda v: v / grad_accum, (grads, metrics))
  return grads_fn


def compiled_temp_bytes(mdef: ModelDef, mesh, plan: MeshPlan, m: int, per_microbatch: int, seq: int,
                        remat: bool = True) -> int:
  """Per-device temp memory (XLA memory_analysis) of the compiled pipelined grads for m microbatches
  of `per_microbatch` sequences of length `seq` (compiled, not run)."""
  params = mdef.abstract_params()
  tokens = jax.ShapeDtypeStruct((m * per_microbatch, seq), jnp.int32)
  fn = make_pipeline_grads_fn(mdef, mesh, plan, m, remat=remat)
  p_sh = pipeline_param_shardings(mdef, mesh, plan)
  b_sh = batch_sharding(mesh, plan)
  with jax.set_mesh(mesh):
    compiled = jax.jit(fn, in_shardings=(p_sh, b_sh), out_shardings=(p_sh, None)).lower(
      params, {"inputs": tokens, "targets": tokens}).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)
