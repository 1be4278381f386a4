"""Batch-invariant forward passes on a mesh (ModelConfig.batch_invariant with tp or dp > 1): the
serving engine's steps and the RL learner's log-prob passes run the model per device, inside one
`shard_map` manual over every mesh axis, so every program does the same written per-device arithmetic.

Why not the auto-sharded jit: GSPMD partitions each program on its own. Measured on tp=2
(docs/serving.md), the tiled model of jaxllm.model.invariant under GSPMD gave 6 of 64 requests other
bits with another prefill chunk size, and 8 of 64 with one decode step per call instead of a scanned
run of steps: the partitioner chose differently for those programs.

Per device, as Megatron-LM's tensor parallelism (jaxllm.parallel.manual):

  - the embedding lookup is vocab-parallel (a psum of one looked-up row and zeros: exact);
  - q/k/v and gate/up are column-parallel: each device's fixed [TILE, D] x [D, F/tp] tiles;
  - the outputs of wo and w_down are partial sums over the local heads / MLP columns, completed by
    `hooks.sum_partials` = psum over tp inside the tile. A psum adds the devices' values element by
    element in one fixed order, so the batch around a row never enters it;
  - attention runs on the local kv heads of the pool shard each device holds;
  - the head gives each device [TILE, V/tp] logits, all-gathered (exact copies) into the full rows
    every device then samples from, or takes log-probs of, with the one-device functions.

Rows are replicated over dp in the engine (each dp rank computes the step's tokens, as a dense model
already does when dp*tp is not a power of two) and split over dp in the learner; a row's arithmetic
is the same either way. The result is batch invariant on its mesh: not the same bits as one device
(the per-device matmul shapes differ), so the engine and the learner of one RL run share the mesh.

Shapes: the package legend in jaxllm/__init__.py (B, T, D, V, N, K, R).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.model import invariant
from jaxllm.parallel.manual import manual, vocab_parallel_embed
from jaxllm.parallel.mesh import MeshPlan, live_axes
from jaxllm.parallel.sharding import logical_spec, param_specs


def _hidden(mdef, plan: MeshPlan, params, tokens, positions, cache, rows):
  """Per device: tokens, positions [B, T] (this device's rows) -> (final hidden [n, D] of the
  flattened rows `rows` (all when None), the local head [D, V/tp], its tiles' gather (None: the
  vocab is whole), cache)."""
  cfg = mdef.cfg
  with manual(plan, cfg):  # sum_partials = psum over tp; the other hooks off
    model = mdef.bind(params)
    x = vocab_parallel_embed(tokens, params["embed"], plan, cfg.vocab_size, jnp.dtype(cfg.dtype))
    x, _, cache = model.run_layers(x, positions, model.layer_params(), cache)
    h = x.reshape(-1, x.shape[-1])
    if rows is not None:
      h = h[rows]  # the final norm and head are row-wise and tiled: selecting first changes no bits
    h = invariant.rms_norm(h, model.final_norm[...], cfg.norm_eps)
    w = model.head_weight()
  gather = None
  if w.shape[-1] != cfg.vocab_size:
    gather = lambda t: jax.lax.all_gather(t, live_axes(plan, "tp"), axis=1, tiled=True)  # noqa: E731
  return h, w, gather, cache


def _engine_forward(mdef, plan: MeshPlan, params, tokens, positions, cache, rows):
  h, w, gather, cache = _hidden(mdef, plan, params, tokens, positions, cache, rows)
  return invariant.logits(h, w, gather), cache


def engine_logits(mdef, mesh, plan: MeshPlan, pool_spec: P, params, tokens, positions, cache, rows):
  """The engine's forward on the mesh: tokens, positions [B, T] and the cache's metadata replicated,
  the pool split as `pool_spec` -> (logits [len(rows), V] fp32 replicated, cache)."""
  cache_spec = jax.tree.map(lambda _: P(), cache).replace(k_pages=pool_spec, v_pages=pool_spec)
  fn = jax.shard_map(
    lambda p, t, s, c, r: _engine_forward(mdef, plan, p, t, s, c, r),
    mesh=mesh,
    in_specs=(param_specs(mdef, plan), P(), P(), cache_spec, P()),
    out_specs=(P(), cache_spec),
    check_vma=False,
  )
  return fn(params, tokens, positions, cache, rows)


def learner_logprobs(mdef, mesh, plan: MeshPlan, params, inputs, targets, temperature):
  """The learner's log-probs [B, T] of targets under params, in the engine's arithmetic on this mesh:
  rows split over dp when B divides; each head tile's logits gathered whole on every tp device, then
  scaled and reduced to log-probs as the engine's sampler does (invariant.head_logprobs)."""
  B, T = inputs.shape
  rows = logical_spec(plan, ("batch", None), inputs.shape)

  def body(p, x, y):
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), x.shape)
    h, w, gather, _ = _hidden(mdef, plan, p, x, pos, None, None)
    return invariant.head_logprobs(h, w, y.reshape(-1), temperature, gather).reshape(y.shape)

  fn = jax.shard_map(body, mesh=mesh, in_specs=(param_specs(mdef, plan), rows, rows), out_specs=rows, check_vma=False)
  return fn(params, inputs, targets)


def replicated(mesh, fn):
  """fn run by every device on whole replicated inputs, as on one device (the engine's sampler on
  the gathered logits): under the auto-sharded jit GSPMD could split its work per program."""
  return jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
