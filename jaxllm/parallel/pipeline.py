"""The pipelined loss: decoder blocks over PP x vPP stages, head and loss on the last stage, in one
`shard_map` manual over every mesh axis, with GPipe-order or interleaved 1F1B schedules.

Layout. Layer params live in the pipeline layout [vpp, pp, C, ...] (`to_pipeline_layout`: element
[r, s, c] is canonical layer (r*pp + s)*C + c, Megatron's placement), the pp dim on the stage axis,
so each stage holds exactly its chunks and no weight moves between stages during a step. The train
state keeps this layout; checkpoints are canonical [L, ...] (jaxllm.train.state converts).

Per device. Inside the shard_map every array is a local shard and the blocks run Megatron-style
manual tensor parallelism (jaxllm.parallel.manual): psum after the row-parallel projections, the
all-to-all expert dispatch of jaxllm.parallel.moe for MoE layers (ep/etp/edp folding inside each
stage), pmean of router statistics over dp. The embedding lookup (vocab-parallel) runs on stage 0
when a microbatch enters, the final norm, head and vocab-parallel cross-entropy on the last stage when
it leaves: once per microbatch, never pp times, and no [B, T, D] hidden state crosses stages.

Schedules (tables from jaxllm.parallel.schedule; `mesh.schedule`):
  gpipe  a scan over ticks of forwards; `jax.grad` through it gives all backwards after all forwards.
         With remat each tick keeps only its stage input for the backward.
  1f1b   every tick a stage runs one chunk forward and one chunk backward, written by hand with
         `jax.vjp`; gradients accumulate in the scan carry, and the loss gradient enters at the last
         stage right after a microbatch's last forward. What a forward leaves for its backward sits
         in a fixed ring of `n_stash` slots per stage, independent of m: with remat the chunk input
         (the backward recomputes the chunk), without it the chunk's vjp residuals (no recompute).
Both: a forward ring (`ppermute` s -> s+1, last -> 0) and (1f1b) a backward ring (s -> s-1) run every
tick outside any branch; which chunk a stage runs, or whether it idles, comes from static tables
indexed by (tick, stage) and a `lax.cond`, so idle slots cost no compute.

Gradient reduction. Parameters are cast to "varying" over the stage axis and the data axes they are
replicated on (dp; edp for experts) once, before the scan, so gradients accumulate per device and are
summed once per step (the transpose of that cast under autodiff; an explicit psum in the 1F1B body),
not per tick -- and never inside a stage's branch, which the other stages would not join.

Shapes: the package legend in jaxllm/__init__.py (B, b, m, T, D, L, C, V).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import ConfigError, check_pipeline
from jaxllm.model import layers as ops
from jaxllm.model.params import ModelDef
from jaxllm.model.transformer import aux_loss, block_forward
from jaxllm.model.transformer import remat as remat_layer
from jaxllm.model.varying import vary, varying_axes
from jaxllm.parallel import manual
from jaxllm.parallel.mesh import MeshPlan, live_axes
from jaxllm.parallel.schedule import COLUMNS, Schedule, make_schedule
from jaxllm.parallel.sharding import PARAM_RULES, logical_spec, param_specs

STAGE = "pp"  # the stage mesh axis (jaxllm.parallel.mesh always names it so)


# ---------------------------------------------------------------------------------------------
# Layout: canonical [L, ...] <-> pipeline [vpp, pp, C, ...]


def stage_of_layer(layer: int, n_layers: int, pp: int, vpp: int) -> tuple[int, int, int]:
  """Megatron placement of canonical layer `layer` -> (repeat, stage, index in chunk)."""
  C = n_layers // (pp * vpp)
  return layer // (C * pp), (layer // C) % pp, layer % C


def to_pipeline_layout(stacked, pp: int, vpp: int):
  """Canonical [L, ...] leaves -> [vpp, pp, C, ...]; element [r, s, c] is layer (r*pp + s)*C + c,
  which is exactly Megatron's placement (a plain reshape, because repeats are outermost)."""
  return jax.tree.map(lambda x: x.reshape(vpp, pp, x.shape[0] // (pp * vpp), *x.shape[1:]), stacked)


def from_pipeline_layout(staged):
  """[vpp, pp, C, ...] leaves -> canonical [L, ...] in model order."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1] * x.shape[2], *x.shape[3:]), staged)


def staged_params(params: dict, pp: int, vpp: int) -> dict:
  """Canonical params -> the same dict with "layers" in pipeline layout."""
  return {**params, "layers": to_pipeline_layout(params["layers"], pp, vpp)}


def canonical_params(params: dict) -> dict:
  """Inverse of staged_params."""
  return {**params, "layers": from_pipeline_layout(params["layers"])}


def staged_specs(mdef: ModelDef, plan: MeshPlan) -> dict:
  """PartitionSpecs of the params with "layers" in pipeline layout: the pp dim on the stage axis, the
  other dims by the logical rules (jaxllm.parallel.sharding)."""
  specs = param_specs(mdef, plan)
  abstract = mdef.abstract_params()["layers"]

  def one(names, a):
    inner = tuple(logical_spec(plan, names[1:], a.shape[1:], PARAM_RULES))
    return P(None, STAGE if plan.cfg.pp > 1 else None, None, *inner)

  layers = jax.tree.map(one, mdef.logical["layers"], abstract, is_leaf=lambda x: isinstance(x, tuple))
  return {**specs, "layers": layers}


def staged_shardings(mdef: ModelDef, mesh, plan: MeshPlan) -> dict:
  """NamedShardings of staged_specs: the train state's placement when pp > 1."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), staged_specs(mdef, plan), is_leaf=lambda x: isinstance(x, P))


def split_microbatches(x, m: int):
  """[B, ...] -> [m, B/m, ...] with microbatch i = rows i, m+i, 2m+i, ... (strided, so a batch dim
  sharded over dp stays sharded over dp inside every microbatch)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


# ---------------------------------------------------------------------------------------------
# Per-device helpers


def _when(pred, fn, *args):
  """lax.cond(pred, fn, zeros): `fn`'s outputs, or zeros of the same shapes and vma types."""
  shapes = jax.eval_shape(fn, *args)

  def zeros(*_):
    return jax.tree.map(lambda s: vary(jnp.zeros(s.shape, s.dtype), tuple(varying_axes(s))), shapes)

  return jax.lax.cond(pred, fn, zeros, *args)


def _add_when(pred, fn, acc, *args):
  """acc + fn(*args) when pred, else acc untouched: idle ticks skip the add, not only fn."""
  return jax.lax.cond(pred, lambda acc, *a: jax.tree.map(jnp.add, acc, fn(*a)), lambda acc, *a: acc, acc, *args)


def _put(buf, slot, value):
  """buf[slot] = value when slot >= 0 (a one-row in-place update either way)."""
  i = jnp.maximum(slot, 0)
  old = jax.lax.dynamic_index_in_dim(buf, i, 0, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, value, old), i, 0)


def _get(buf, slot):
  return jax.lax.dynamic_index_in_dim(buf, jnp.maximum(slot, 0), 0, keepdims=False)


def _aux_names(cfg) -> tuple[str, ...]:
  return ("load_balance", "router_z") if cfg.is_moe else ()


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass(frozen=True, eq=False)
class Pipeline:
  """The pipelined LM loss of one model on one mesh: `sums` (forward; differentiable, GPipe order)
  and `value_and_grad` (the train step's gradients, by the configured schedule). Params have
  "layers" in pipeline layout (staged_params); batches are {inputs, targets[, mask]} [B, T]."""

  mdef: ModelDef
  mesh: jax.sharding.Mesh
  plan: MeshPlan
  microbatches: int
  schedule: str = "1f1b"  # "1f1b" or "gpipe" (jaxllm.parallel.schedule)
  remat: bool = True  # keep only each chunk's input per microbatch; recompute it in the backward
  capacity_factor: float = 0.0  # MoE: 0 = dropless, else GShard capacity (jaxllm.parallel.moe)

  def __post_init__(self):
    cfg, c = self.mdef.cfg, self.plan.cfg
    check_pipeline(c.pp, c.vpp, self.microbatches, n_layers=cfg.n_layers)
    manual.check_manual(cfg, self.plan)
    object.__setattr__(self, "_gathers", manual.fsdp_gathers(self.mdef, self.plan))

  @functools.cached_property
  def tables(self) -> dict[str, Schedule]:
    c = self.plan.cfg
    return {k: make_schedule(k, c.pp, c.vpp, self.microbatches) for k in {"gpipe", self.schedule}}

  # -- entry points ---------------------------------------------------------------------------

  def sums(self, params, batch):
    """-> (sum of token NLLs over the counted tokens, aux dict averaged over layers and microbatches)."""
    fn = self._shard_map(self._gpipe_body, n_extra=0, grads=False)
    nll, aux = fn(params, *self._microbatches(batch))
    return nll, aux

  def value_and_grad(self, params, batch, nll_weight, aux_weight):
    """Gradients of nll_sum * nll_weight + aux_loss(aux) * aux_weight -> (grads, nll_sum, aux)."""
    if self.schedule == "gpipe":

      def objective(p):
        nll, aux = self.sums(p, batch)
        return nll * nll_weight + aux_loss(self.mdef.cfg, aux) * aux_weight, (nll, aux)

      (_, (nll, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
      return grads, nll, aux
    fn = self._shard_map(self._1f1b_body, n_extra=2, grads=True)
    grads, nll, aux = fn(params, *self._microbatches(batch), jnp.float32(nll_weight), jnp.float32(aux_weight))
    return grads, nll, aux

  # -- plumbing --------------------------------------------------------------------------------

  def _microbatches(self, batch):
    B, m = batch["inputs"].shape[0], self.microbatches
    if batch.get("segment_ids") is not None or batch.get("positions") is not None:
      raise ConfigError(
        "document masks (segment_ids / positions in the batch) are not supported with pipeline "
        "parallelism (mesh.pp > 1) yet; use mesh.pp=1 or train.document_masks=false"
      )
    if B % m:
      raise ConfigError(
        f"batch of {B} sequences does not split into {m} microbatches; make the "
        f"per-step batch (train.batch_size/train.grad_accum) a multiple of {m}"
      )
    mask = batch.get("mask")
    mask = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return tuple(split_microbatches(x, m) for x in (batch["inputs"], batch["targets"], mask))

  def _shard_map(self, body, n_extra: int, grads: bool):
    specs = staged_specs(self.mdef, self.plan)
    dp = live_axes(self.plan, "dp")
    mb = P(None, dp or None)
    out = (specs, P(), P()) if grads else (P(), P())
    return jax.shard_map(
      body,
      mesh=self.mesh,
      in_specs=(specs, mb, mb, mb) + (P(),) * n_extra,
      out_specs=out,
      axis_names=set(self.mesh.axis_names),
      check_vma=True,
    )

  def _setup(self, params, tokens):
    """Per-device pieces shared by both bodies (called inside the shard_map)."""
    cfg, plan = self.mdef.cfg, self.plan
    # Cast every parameter to varying over the stage axis and the data axes it is replicated on (dp;
    # edp too for experts), once, here: per-tick gradient contributions then stay local and are summed
    # once per step, and no gradient psum lands inside a stage's branch (where the other stages,
    # taking other branches, would never join it).
    data = set(live_axes(plan, "dp")) | {STAGE}
    edp = set(live_axes(plan, "edp"))

    def cast(names, x):
      axes = (data | (edp if "exp" in names else set())) - varying_axes(x)
      return vary(x, tuple(sorted(axes)))

    params = jax.tree.map(cast, self.mdef.logical, params, is_leaf=lambda x: isinstance(x, tuple))
    layers = jax.tree.map(lambda a: a[:, 0], params["layers"])  # [vpp, C, ...] this stage's chunks
    b, T = tokens.shape[1:]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
    cos, sin = ops.rope_tables(positions, ops.rope_inv_freq(cfg))
    act_axes = tuple(sorted({STAGE} | set(live_axes(plan, "dp"))))  # what activations vary over
    return params, layers, cos, sin, act_axes

  def _chunk(self, w, x, cos, sin, layer_remat):
    """The C layers of one chunk on one microbatch: x [b, T, D] -> (x, {aux name: sum over C layers})."""
    cfg = self.mdef.cfg

    def body(x, p):
      p = manual.gather_fsdp(p, self._gathers["layers"], skip=1)
      x, _, aux = block_forward(cfg, manual.localize_layer_params(p, self.plan, cfg), x, cos, sin, None, 0)
      return x, aux

    x, aux = jax.lax.scan(remat_layer(body, layer_remat), x, w)
    return x, {k: jnp.sum(v) for k, v in aux.items()}

  def _embed(self, params, tokens):
    cfg = self.mdef.cfg
    embed = manual.gather_fsdp({"embed": params["embed"]}, self._gathers)["embed"]
    return manual.vocab_parallel_embed(tokens, embed, self.plan, cfg.vocab_size, jnp.dtype(cfg.dtype))

  def _head_nll(self, head, y, targets, mask):
    """Final norm, vocab-parallel head and masked NLL sum of one microbatch on the last stage."""
    cfg = self.mdef.cfg
    head = manual.gather_fsdp(head, self._gathers)
    h = ops.rms_norm(y, head["final_norm"], cfg.norm_eps)
    w = head["embed"].T if cfg.tie_embeddings else head["lm_head"]
    nll = manual.vocab_parallel_nll(h, w, targets, self.plan, cfg.vocab_size)
    return jnp.sum(nll * mask)

  def _head_params(self, params):
    return {
      k: params[k] for k in (("final_norm", "embed") if self.mdef.cfg.tie_embeddings else ("final_norm", "lm_head"))
    }

  def _stage_input(self, s, row, recv, fbank, params, tokens, act_axes):
    """Stage 0: a fresh microbatch's embedding, or a banked ring arrival; other stages: the ring."""
    fresh = (s == 0) & (row["f_src"] < 0) & (row["f_r"] >= 0)
    ring = jnp.where(s == 0, _get(fbank, row["f_src"]), recv)
    return jax.lax.cond(
      fresh, lambda: vary(self._embed(params, _get(tokens, row["f_j"])), act_axes), lambda: vary(ring, act_axes)
    )

  def _ring(self, x, step: int):
    pp = self.plan.cfg.pp
    return jax.lax.ppermute(x, STAGE, [(i, (i + step) % pp) for i in range(pp)])

  def _finish(self, nll, aux_acc):
    """Sum over devices and average aux over layers and microbatches."""
    L = self.mdef.cfg.n_layers
    total = lambda x: jax.lax.psum(x, tuple(sorted(varying_axes(x)))) if varying_axes(x) else x
    return total(nll), {n: total(v) / (L * self.microbatches) for n, v in aux_acc.items()}

  # -- GPipe order: forward scan, autodiff backward -----------------------------------------------

  def _gpipe_body(self, params, tokens, targets, mask):
    cfg, plan, sched = self.mdef.cfg, self.plan, self.tables["gpipe"]
    pp, vpp = plan.cfg.pp, plan.cfg.vpp
    with manual.manual(plan, cfg, self.capacity_factor):
      params, layers, cos, sin, act = self._setup(params, tokens)
      head = self._head_params(params)
      s = jax.lax.axis_index(STAGE)
      table = jnp.asarray(sched.table)

      def stage_apply(w_all, r, x):
        w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False), w_all)
        y, aux = self._chunk(w, x, cos, sin, "none" if self.remat else cfg.remat)
        return vary(y, act), aux

      # Residuals of a lax.cond branch leave it as per-tick outputs, which the scan's autodiff stacks
      # over ticks -- the weights among them. A remat region around the branch keeps only its inputs
      # (the tick input; the weights stay scan constants). Without remat the stage runs every slot,
      # idle ones on zeros, so the weights it saves are scan constants too. The head is always
      # rematerialised (one more head matmul per microbatch, in the backward).
      def run_stage(w_all, r, x):
        if not self.remat:
          y, aux = stage_apply(w_all, jnp.maximum(r, 0), x)
          return y, {n: jnp.where(r >= 0, v, 0.0) for n, v in aux.items()}
        return _when(r >= 0, stage_apply, w_all, jnp.maximum(r, 0), x)

      def run_head(head, y, last, tgt, msk):
        return _when(last, self._head_nll, head, y, tgt, msk)

      nothing = jax.checkpoint_policies.nothing_saveable
      if self.remat:
        run_stage = jax.checkpoint(run_stage, policy=nothing)
      run_head = jax.checkpoint(run_head, policy=nothing)

      def tick(carry, t):
        recv, fbank, nll, aux_acc = carry
        row = {c: table[i, t, s] for i, c in enumerate(COLUMNS)}
        fbank = _put(fbank, row["f_bank"], recv)
        x_in = self._stage_input(s, row, recv, fbank, params, tokens, act)
        r, j = row["f_r"], row["f_j"]
        y, aux = run_stage(layers, r, x_in)
        nll = nll + run_head(head, y, (r == vpp - 1) & (s == pp - 1), _get(targets, j), _get(mask, j))
        aux_acc = {n: aux_acc[n] + aux[n] for n in aux_acc}
        return (self._ring(y, 1), fbank, nll, aux_acc), None

      b, T = tokens.shape[1:]
      zero_x = vary(jnp.zeros((b, T, cfg.d_model), jnp.dtype(cfg.dtype)), act)
      fbank = vary(jnp.zeros((sched.n_fbank, b, T, cfg.d_model), zero_x.dtype), act)
      init = (zero_x, fbank, vary(jnp.float32(0), act), {n: vary(jnp.float32(0), (STAGE,)) for n in _aux_names(cfg)})
      (_, _, nll, aux_acc), _ = jax.lax.scan(tick, init, jnp.arange(sched.ticks, dtype=jnp.int32))
      return self._finish(nll, aux_acc)

  # -- Interleaved 1F1B: one forward and one hand-written backward per tick ----------------------

  def _1f1b_body(self, params, tokens, targets, mask, nll_weight, aux_weight):
    cfg, plan, sched = self.mdef.cfg, self.plan, self.tables["1f1b"]
    pp, L, m = plan.cfg.pp, cfg.n_layers, self.microbatches
    coefs = {"load_balance": cfg.aux_loss_coef, "router_z": cfg.z_loss_coef}
    with manual.manual(plan, cfg, self.capacity_factor):
      params, layers, cos, sin, act = self._setup(params, tokens)
      head = self._head_params(params)
      s = jax.lax.axis_index(STAGE)
      table = jnp.asarray(sched.table)

      def index(r):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False), layers)

      def aux_cot(aux_axes):
        # Each layer's MoE statistics enter the loss as coef / (L * m) per microbatch.
        return {n: vary(aux_weight * coefs[n] / (L * m), tuple(axes)) for n, axes in aux_axes.items()}

      def chunk_vjp(w, x):
        # Recomputing from the input already is the remat; otherwise the model's per-layer policy
        # decides what the residuals hold.
        return jax.vjp(lambda w, x: self._chunk(w, x, cos, sin, "none" if self.remat else cfg.remat), w, x)

      # What a forward stashes for its backward. remat: the chunk input, recomputed in the backward.
      # No remat: the chunk's vjp residuals (jax.vjp's pullback is a pytree of them), minus the
      # weights, which the backward takes from the params again; `layout` remembers where they go.
      layout = {}

      def forward(r, x):
        if self.remat:
          y, aux = self._chunk(index(r), x, cos, sin, "none")
          return vary(y, act), aux, [x]
        w = index(r)
        (y, aux), vjp = chunk_vjp(w, x)
        leaves, layout["tree"] = jax.tree.flatten(vjp)
        weights = jax.tree.leaves(w)
        layout["at"] = [next((i for i, wt in enumerate(weights) if leaf is wt), -1) for leaf in leaves]
        layout["types"] = (varying_axes(y), {n: varying_axes(v) for n, v in aux.items()})
        return vary(y, act), aux, [leaf for leaf, at in zip(leaves, layout["at"]) if at < 0]

      def backward(r, saved, dy):
        if self.remat:
          (y, aux), vjp = chunk_vjp(index(r), saved[0])
          y_axes, aux_axes = varying_axes(y), {n: varying_axes(v) for n, v in aux.items()}
        else:
          weights, rest = jax.tree.leaves(index(r)), iter(saved)
          vjp = jax.tree.unflatten(layout["tree"], [weights[at] if at >= 0 else next(rest) for at in layout["at"]])
          y_axes, aux_axes = layout["types"]
        dw, dx = vjp((vary(dy, tuple(y_axes)), aux_cot(aux_axes)))
        return dw, vary(dx, act)

      def loss_grad(acc_head, y, tgt, msk):
        # -> (nll, gradient at the last chunk's output, head gradients added into acc_head)
        nll, vjp = jax.vjp(lambda h, y: self._head_nll(h, y, tgt, msk), head, y)
        d_head, dy = vjp(vary(nll_weight, tuple(varying_axes(nll))))
        return vary(nll, act), vary(dy, act), jax.tree.map(jnp.add, acc_head, d_head)

      def no_loss(acc_head, y, tgt, msk):
        return vary(jnp.float32(0), act), vary(jnp.zeros_like(y), act), acc_head

      def embed_grad(tok, dx):
        _, vjp = jax.vjp(lambda e: vary(self._embed({"embed": e}, tok), act), params["embed"])
        return vjp(dx)[0]

      def tick(carry, t):
        f_recv, b_recv, fbank, gbank, stash, acc, nll, aux_acc = carry
        row = {c: table[i, t, s] for i, c in enumerate(COLUMNS)}
        fbank = _put(fbank, row["f_bank"], f_recv)
        gbank = _put(gbank, row["b_bank"], b_recv)
        # Forward.
        x_in = self._stage_input(s, row, f_recv, fbank, params, tokens, act)
        r, j = row["f_r"], row["f_j"]
        y, aux, saved = _when(r >= 0, forward, jnp.maximum(r, 0), x_in)
        stash = [_put(buf, row["stash_put"], v) for buf, v in zip(stash, saved)]
        aux_acc = {n: aux_acc[n] + aux[n] for n in aux_acc}
        # Loss and its gradient, right after a microbatch's last chunk.
        nll_j, dy_loss, acc_head = jax.lax.cond(
          row["g_put"] >= 0, loss_grad, no_loss, {k: acc[k] for k in head}, y, _get(targets, j), _get(mask, j)
        )
        gbank = _put(gbank, row["g_put"], dy_loss)
        # Backward.
        rb, jb = row["b_r"], row["b_j"]
        dy = jnp.where(s == pp - 1, _get(gbank, row["b_src"]), b_recv)
        dw, dx = _when(rb >= 0, backward, jnp.maximum(rb, 0), [_get(buf, row["stash_get"]) for buf in stash], dy)
        acc = {**acc, **acc_head}
        acc["embed"] = _add_when((rb == 0) & (s == 0), embed_grad, acc["embed"], _get(tokens, jb), dx)
        i = jnp.maximum(rb, 0)
        acc["layers"] = jax.tree.map(
          lambda a, g: jax.lax.dynamic_update_index_in_dim(
            a, jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False) + g, i, 0
          ),
          acc["layers"],
          dw,
        )
        return (self._ring(y, 1), self._ring(dx, -1), fbank, gbank, stash, acc, nll + nll_j, aux_acc), None

      b, T, D = tokens.shape[1], tokens.shape[2], cfg.d_model
      dt = jnp.dtype(cfg.dtype)
      zeros = lambda *shape: vary(jnp.zeros(shape, dt), act)
      acc = {k: jax.tree.map(jnp.zeros_like, v) for k, v in params.items()}
      acc["layers"] = jax.tree.map(jnp.zeros_like, layers)
      acc = jax.tree.map(lambda z, p: vary(z, tuple(varying_axes(p) | {STAGE})), acc, {**params, "layers": layers})
      saved = jax.eval_shape(forward, jnp.int32(0), zeros(b, T, D))[2]
      stash = [vary(jnp.zeros((sched.n_stash, *v.shape), v.dtype), tuple(varying_axes(v))) for v in saved]
      init = (
        zeros(b, T, D),
        zeros(b, T, D),
        zeros(sched.n_fbank, b, T, D),
        zeros(sched.n_gbank, b, T, D),
        stash,
        acc,
        vary(jnp.float32(0), act),
        {n: vary(jnp.float32(0), (STAGE,)) for n in _aux_names(cfg)},
      )
      (_, _, _, _, _, acc, nll, aux_acc), _ = jax.lax.scan(tick, init, jnp.arange(sched.ticks, dtype=jnp.int32))
      # One sum per step over the devices each gradient was split into contributions on.
      specs = staged_specs(self.mdef, plan)
      acc["layers"] = jax.tree.map(lambda a: a[:, None], acc["layers"])

      def reduce(g, spec):
        named = {a for d in spec if d for a in ((d,) if isinstance(d, str) else d)}
        axes = tuple(sorted(varying_axes(g) - named))
        return jax.lax.psum(g, axes) if axes else g

      grads = jax.tree.map(reduce, acc, specs, is_leaf=lambda x: isinstance(x, P))
      nll, aux = self._finish(nll, aux_acc)
      return grads, nll, aux
