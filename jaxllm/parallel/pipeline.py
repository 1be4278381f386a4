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

Only the decoder blocks are pipelined; the embedding and final norm run in the auto-sharded part of
the step (replicated over the stage axis), and the head and loss are the trainer's (jaxllm.train.step
takes `pipeline_hidden` as its forward, so loss and gradient accumulation have one code path).
The shard_map is manual over the stage axis only, so dp/tp/ep sharding inside a stage stays automatic (GSPMD), and the backward pass
is plain autodiff through the scan over ticks. With `remat=True` each tick saves only its stage
input; the stage is recomputed in the backward pass, so activation memory grows by one [b, T, D]
per tick instead of every layer's intermediates.

Parameters and checkpoints stay canonical ([L, ...] in model order, the L dim split over the stage
axis by the rules table's `layers -> pp`); `to_pipeline_layout` is a reshape computed inside the
step and constrained onto the stage axis.

Shapes: the package legend in jaxllm/__init__.py (B, b, m, T, D, L, C).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.config import ConfigError, check_pipeline
from jaxllm.model import hooks
from jaxllm.model import layers as ops
from jaxllm.model.params import ModelDef
from jaxllm.model.transformer import block_forward, remat as remat_layer
from jaxllm.parallel.mesh import MeshPlan
from jaxllm.parallel.sharding import logical_spec

STAGE = "pp"   # the stage mesh axis (jaxllm.parallel.mesh always names it so)


# ---------------------------------------------------------------------------------------------
# Schedule accounting (the validity check, jaxllm.config.check_pipeline, is shared with the config)

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
  return jax.tree.map(lambda x: x.reshape(vpp, pp, x.shape[0] // (pp * vpp), *x.shape[1:]), stacked)


def from_pipeline_layout(staged):
  """[vpp, pp, C, ...] leaves -> canonical [L, ...] in model order."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1] * x.shape[2], *x.shape[3:]), staged)


def staged_shardings(mdef: ModelDef, mesh, plan: MeshPlan) -> dict:
  """NamedShardings of the layer params in pipeline layout [vpp, pp, C, ...]: the pp dim on the stage
  axis, the other dims by the logical rules. (The canonical [L, ...] params are placed by
  jaxllm.parallel.sharding.param_shardings, which splits L over the stage axis in contiguous blocks:
  exactly the stage placement when vpp == 1. With vpp > 1 a stage's chunks are not one contiguous
  block of [L], so the step moves the weights into place once per step -- an all-to-all over the
  stage axis, not an all-gather -- and the gradients back; per microbatch only the ppermutes move.)"""
  abstract = mdef.abstract_params()["layers"]

  def one(names, a):
    inner = tuple(logical_spec(plan, names[1:], a.shape[1:]))
    return NamedSharding(mesh, P(None, STAGE if plan.cfg.pp > 1 else None, None, *inner))
  return jax.tree.map(one, mdef.logical["layers"], abstract, is_leaf=lambda x: isinstance(x, tuple))


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
    # ("manual axis after free axis 'pp'"); experts inside stages stay on the local path for now.
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
# The pipelined forward (the train step's `forward`)

def split_microbatches(x, m: int):
  """[B, ...] -> [m, B/m, ...] with microbatch i = rows i, m+i, 2m+i, ... (strided, so a batch dim
  sharded over dp stays sharded over dp inside every microbatch)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def merge_microbatches(x):
  """Inverse of split_microbatches: [m, b, ...] -> [m*b, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def pipeline_hidden(mdef: ModelDef, params, tokens, mesh, plan: MeshPlan, microbatches: int,
                    remat: bool = True):
  """Same contract as the model's `hidden` without a cache: tokens [B, T] -> (final hidden [B, T, D]
  after the last norm, aux). MoE aux statistics are per microbatch and averaged over layers and
  microbatches, as Megatron computes them under pipelining."""
  cfg, pp, vpp, m = mdef.cfg, plan.cfg.pp, plan.cfg.vpp, microbatches
  check_pipeline(pp, vpp, m, n_layers=cfg.n_layers)
  B = tokens.shape[0]
  if B % m:
    raise ConfigError(f"batch of {B} sequences does not split into {m} microbatches; make the "
                      f"per-step batch (train.batch_size/train.grad_accum) a multiple of {m}")
  model = mdef.bind(params)
  x = split_microbatches(model.embed_tokens(tokens), m)               # [m, b, T, D]
  staged = to_pipeline_layout(params["layers"], pp, vpp)
  staged = jax.lax.with_sharding_constraint(staged, staged_shardings(mdef, mesh, plan))
  y, aux = pipeline_layers(cfg, staged, x, mesh, m, remat)
  return ops.rms_norm(merge_microbatches(y), params["final_norm"], cfg.norm_eps), aux
