"""Expert-parallel MoE dispatch under MoE Parallel Folding (Megatron Core, 2025), in one shard_map.

`expert_parallel(mesh, plan)` returns a function with the signature and result of
`jaxllm.model.moe.local_experts` (x [B, T, D], ids/weights [B, T, k], w_gate/w_up [E, D, F],
w_down [E, F, D] -> [B, T, D]) that runs the experts sharded over the mesh. Its body,
`device_experts(plan)`, also serves code that is already manual over every mesh axis
(jaxllm.parallel.manual): the same function on local shards.

Shapes: the package legend in jaxllm/__init__.py (B, T, D, E, k, F). Local counts are words: n_own
tokens a device owns, n_local = E/ep experts a device holds, n_slots = n_own*k routed slots, buf_rows
rows per ep peer in the exchange buffers, n_src source buffers after the exchange (ep, or etp*ep).

  attention view: x is split over `dp` (batch) and replicated over `tp`;
  MoE view:       experts are split over `ep`, each expert's hidden dim F over `etp`, and the
                  expert weights are replicated over `edp` -- on the same devices.

Per device, inside `jax.shard_map` manual over every mesh axis:
  1. Token ownership. The tp ranks of a dp group hold the same tokens; each takes a distinct
     1/tp slice so no token slot is dispatched twice (EP may span tp devices: folding). Every
     device now owns a unique chunk of n_own tokens.
  2. Route-sort: sort the chunk's n_own*k slots by expert; slots of one ep peer are then contiguous.
  3. all_to_all over the ep axes of fixed [ep, buf_rows, D] buffers plus per-expert counts. Dropless:
     buf_rows = n_own*min(k, n_local) is the worst case (every token sends all the slots it can to one
     peer; a token's k expert ids are distinct, as top-k makes them), so nothing is ever dropped. With a
     capacity factor, buf_rows = n_local * cap and slots past an expert's capacity are dropped (see below).
  4. ETP: all_gather the received rows over the etp axes, so every etp rank sees all rows of its
     experts; grouped matmul (`jax.lax.ragged_dot`) with its F-slice gives partial outputs, which
     `psum_scatter` over etp sums and hands back to the rank that gathered them
     (= the psum of the expert hidden dim, fused with the scatter).
  5. all_to_all back, weight by the router probs, scatter-add into tokens, all_gather over tp so
     the output is replicated over tp again, as attention expects.
Gradients of the expert weights are summed over edp (and every axis they are replicated on) by
shard_map's transpose: the in_specs declare them invariant there (checked by tests/parallel/test_folding.py).

Capacity-factor mode (`capacity_factor > 0`, GShard/Switch style, per source device): each device
sends at most cap = ceil(capacity_factor * n_own*k / E) slots to each expert; the rest are dropped
(their expert output is 0, the token keeps its residual and other experts). Buffers shrink from
n_own*min(k, n_local) to n_local*cap rows per peer. Dropless (`capacity_factor = 0`) is the default.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.config import ConfigError
from jaxllm.model.moe import expert_ffn
from jaxllm.parallel.mesh import MeshPlan, live_axes


def device_experts(plan: MeshPlan, capacity_factor: float = 0.0):
  """The per-device dispatch, for code already inside a `shard_map` manual over every mesh axis
  (`expert_parallel`'s body; jaxllm.parallel.manual installs it as the `moe_experts` hook).
  fn(x [B/dp, T, D] (this dp rank's tokens, replicated over tp), ids, weights [B/dp, T, k],
  w_gate, w_up [E/ep, D, F/etp], w_down [E/ep, F/etp, D]) -> [B/dp, T, D], replicated over tp."""
  tp, ep, etp = live_axes(plan, "tp"), live_axes(plan, "ep"), live_axes(plan, "etp")
  n_tp, n_ep, n_etp = plan.size("tp"), plan.size("ep"), plan.size("etp")

  def experts(x, ids, weights, w_gate, w_up, w_down):
    B_dp, T, _ = x.shape
    if B_dp * T % n_tp:
      raise ConfigError(
        f"MoE under folding needs the tokens per dp rank ({B_dp}*{T}) divisible by "
        f"tp={n_tp}; change the batch size or sequence length"
      )
    return _device_experts(
      x,
      ids,
      weights,
      w_gate,
      w_up,
      w_down,
      tp=tp,
      ep=ep,
      etp=etp,
      n_tp=n_tp,
      n_ep=n_ep,
      n_etp=n_etp,
      capacity_factor=capacity_factor,
    )

  return experts


def expert_parallel(mesh, plan: MeshPlan, capacity_factor: float = 0.0):
  """The `moe_experts` hook for this mesh (see module docstring)."""
  dp, ep, etp = live_axes(plan, "dp"), live_axes(plan, "ep"), live_axes(plan, "etp")
  n_tp, n_ep, n_etp = plan.size("tp"), plan.size("ep"), plan.size("etp")

  def spec(*dims):
    return P(*[(d if len(d) > 1 else d[0]) if d else None for d in dims])

  tok_spec = spec(dp, (), ())
  gate_spec = spec(ep, (), etp)  # [E, D, F]
  down_spec = spec(ep, etp, ())  # [E, F, D]
  body = device_experts(plan, capacity_factor)

  def experts(x, ids, weights, w_gate, w_up, w_down):
    B, T, D = x.shape
    E = w_gate.shape[0]
    if E % n_ep:
      raise ConfigError(f"n_experts={E} must be divisible by mesh.ep={n_ep}")
    if w_gate.shape[-1] % n_etp:
      raise ConfigError(f"expert hidden size {w_gate.shape[-1]} must be divisible by mesh.etp={n_etp}")
    if B % plan.size("dp") or (B // plan.size("dp")) * T % n_tp:
      raise ConfigError(
        f"MoE under folding needs batch {B} divisible by dp={plan.size('dp')} and the "
        f"tokens per dp rank ({B}/{plan.size('dp')}*{T}) divisible by tp={n_tp}; "
        "change the batch size or sequence length"
      )
    fn = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(tok_spec, tok_spec, tok_spec, gate_spec, gate_spec, down_spec),
      out_specs=tok_spec,
      axis_names=set(mesh.axis_names),
      check_vma=True,
    )
    return fn(x, ids, weights, w_gate, w_up, w_down)

  return experts


def _device_experts(x, ids, weights, w_gate, w_up, w_down, *, tp, ep, etp, n_tp, n_ep, n_etp, capacity_factor):
  """Per-device body. x [B/dp, T, D] (this dp rank's tokens); w_* this device's [E/ep, D, F/etp] shards."""
  B_dp, T, D = x.shape
  k = ids.shape[-1]
  n_own = B_dp * T // n_tp
  # 1. This tp rank's slice of the (tp-replicated) tokens.
  r = jax.lax.axis_index(tp) if tp else 0
  xc = jax.lax.dynamic_slice_in_dim(x.reshape(B_dp * T, D), r * n_own, n_own)
  ids_c = jax.lax.dynamic_slice_in_dim(ids.reshape(B_dp * T, k), r * n_own, n_own)
  w_c = jax.lax.dynamic_slice_in_dim(weights.reshape(B_dp * T, k), r * n_own, n_own)
  y = _dispatch(
    xc, ids_c, w_c, w_gate, w_up, w_down, ep=ep, etp=etp, n_ep=n_ep, capacity_factor=capacity_factor
  )  # [n_own, D]
  # 5b. Back to the attention layout: replicated over tp.
  if tp:
    y = jax.lax.all_gather(y, tp, axis=0, tiled=True, to="invarying")
  return y.reshape(B_dp, T, D).astype(x.dtype)


def _dispatch(xc, ids_c, w_c, w_gate, w_up, w_down, *, ep, etp, n_ep, capacity_factor):
  """xc [n_own, D] tokens this device owns; ids_c, w_c [n_own, k] -> expert mixture [n_own, D]."""
  n_own, D = xc.shape
  k = ids_c.shape[-1]
  n_local = w_gate.shape[0]  # local experts, E/ep
  E = n_local * n_ep
  n_slots = n_own * k  # token slots
  # 2. Sort slots by expert: peer p's slots (experts p*n_local .. p*n_local+n_local-1) become contiguous.
  flat = ids_c.reshape(n_slots)
  order = jnp.argsort(flat, stable=True)
  sid = flat[order]  # [n_slots] expert of each sorted slot
  tok = order // k  # [n_slots] token of each sorted slot
  counts = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E]
  e_start = jnp.cumsum(counts) - counts
  peer = sid // n_local
  if capacity_factor > 0:
    cap = max(1, math.ceil(capacity_factor * n_slots / E))
    rank_in_e = jnp.arange(n_slots) - e_start[sid]
    keep = rank_in_e < cap
    pos = jnp.where(keep, (sid % n_local) * cap + rank_in_e, n_local * cap)  # out of range -> dropped
    sent = jnp.minimum(counts, cap)
    buf_rows = n_local * cap
  else:
    peer_counts = counts.reshape(n_ep, n_local).sum(axis=1)
    pos = jnp.arange(n_slots) - (jnp.cumsum(peer_counts) - peer_counts)[peer]
    keep = jnp.ones((n_slots,), bool)
    sent = counts
    # Worst case for one peer: a token's k experts are distinct (top-k), so it sends at most
    # min(k, n_local) slots to a peer holding n_local experts.
    buf_rows = n_own * min(k, n_local)
  send = jnp.zeros((n_ep, buf_rows, D), xc.dtype).at[peer, pos].set(xc[tok], mode="drop")
  # 3. Exchange over ep: recv[s] = rows source s sent to me, recv_counts[s, e] per local expert.
  recv, recv_counts = send, sent.reshape(n_ep, n_local)
  if ep:
    recv = jax.lax.all_to_all(send, ep, 0, 0, tiled=True)
    recv_counts = jax.lax.all_to_all(recv_counts, ep, 0, 0, tiled=True)
  # 4. ETP: every etp rank of my expert group processes the union of the group's rows.
  if etp:
    recv = jax.lax.all_gather(recv, etp, axis=0, tiled=True)  # [etp*ep, buf_rows, D]
    recv_counts = jax.lax.all_gather(recv_counts, etp, axis=0, tiled=True)  # [etp*ep, n_local]
  n_src = recv.shape[0]
  rexp = _row_experts(recv_counts, buf_rows, capacity_factor > 0)  # [n_src, buf_rows]
  rows, rexp = recv.reshape(n_src * buf_rows, D), rexp.reshape(n_src * buf_rows)
  order2 = jnp.argsort(rexp, stable=True)
  group_sizes = jnp.bincount(rexp, length=n_local + 1)[:n_local].astype(jnp.int32)
  ys = expert_ffn(rows[order2], group_sizes, w_gate, w_up, w_down)  # [n_src*buf_rows, D] partial over F
  ys = jnp.where((rexp[order2] < n_local)[:, None], ys, 0)
  back = jnp.zeros_like(ys).at[order2].set(ys).reshape(n_src, buf_rows, D)
  if etp:
    back = jax.lax.psum_scatter(back, etp, scatter_dimension=0, tiled=True)  # [ep, buf_rows, D], summed over F
  # 5. Return to the senders, weight, combine.
  if ep:
    back = jax.lax.all_to_all(back, ep, 0, 0, tiled=True)
  y_slot = back.at[peer, pos].get(mode="fill", fill_value=0)  # [n_slots, D]
  y_slot = y_slot * (w_c.reshape(n_slots)[order] * keep)[:, None].astype(y_slot.dtype)
  return jnp.zeros((n_own, D), y_slot.dtype).at[tok].add(y_slot)


def _row_experts(counts, buf_rows: int, fixed_slots: bool):
  """Local expert of every received row, n_local for padding. counts [n_src, n_local] rows each
  source sent -> [n_src, buf_rows] int32.

  Dropless buffers hold each source's rows packed in expert order; capacity buffers give expert e
  the fixed rows e*cap .. e*cap+cap-1."""
  n_src, n_local = counts.shape
  j = jnp.arange(buf_rows)
  if fixed_slots:
    cap = buf_rows // n_local
    e = j // cap
    valid = (j % cap)[None, :] < jnp.take_along_axis(counts, jnp.broadcast_to(e, (n_src, buf_rows)), axis=1)
    return jnp.where(valid, e[None, :], n_local)
  ends = jnp.cumsum(counts, axis=1)  # [n_src, n_local]
  e = jax.vmap(lambda en: jnp.searchsorted(en, j, side="right"))(ends)  # [n_src, buf_rows] in 0..n_local
  return e.astype(jnp.int32)
