"""The engine's jitted step functions over the paged KV pool (jaxllm.serve.engine runs them):

  step     one forward of a ragged token row (prefill chunks and decodes) or of one decode token per
           sequence, the logits of each sequence's last row, sampling on device;
  multi    `steps` decode steps in one lax.scan, each step's sampled tokens fed to the next;
  forward  step's decode forward alone -> logits, and
  sample   step's sampling alone on them: a decode with grammar rows runs as these two, so the host
           computes the grammar masks of the tokens sampled last while the device runs the forward.

Both take and return the KV pages and the penalty store (donated) and count their traces, so the
engine can report compiles. Shapes: the package legend (R, Q, M, V, n); the model sees a step's Q
tokens as B = `rows` rows of T = Q / rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import ModelConfig
from jaxllm.model.params import model_def
from jaxllm.parallel.invariant_tp import engine_logits, replicated
from jaxllm.serve.paged_cache import INVARIANT, PagedCache, attention_backend
from jaxllm.serve.penalties import count_tokens, gather_penalty_state
from jaxllm.serve.sampling import advance, sample_rows, sample_rows_invariant


class Step:
  """A jitted step function that counts its traces (= compilations: one per new input shape)."""

  def __init__(self, cfg, attention: str, mode: str, mesh, plan, pool_sh, rows: int = 1, steps: int = 1):
    mdef = model_def(cfg)
    # Batch-invariant steps (ModelConfig.batch_invariant): their own attention and a tiled sampler.
    backend = INVARIANT if cfg.batch_invariant else attention_backend(attention, mesh, plan, cfg)
    sample_rows_of = sample_rows_invariant if cfg.batch_invariant else sample_rows
    # ... and on a mesh, the forward per device in one shard_map (jaxllm.parallel.invariant_tp)
    manual_tp = cfg.batch_invariant and mesh is not None and mesh.size > 1
    if manual_tp:
      manual_logits = functools.partial(engine_logits, mdef, mesh, plan, pool_sh.spec)
      sample_rows_of = replicated(mesh, sample_rows_invariant)
    decode = mode != "ragged"
    self.traces = 0

    def hidden_logits(params, k_pages, v_pages, tokens, positions, meta):
      """The forward: -> (k_pages, v_pages, logits [R, V] of each sequence's last row)."""
      model = mdef.bind(params)
      cache = PagedCache(
        k_pages,
        v_pages,
        meta["slots"],
        meta["kv_lens"],
        meta["page_table"],
        meta["cu_q_lens"],
        meta["num_seqs"],
        meta.get("num_multi"),
        meta.get("dec_rows"),
        backend,
        decode,
      )
      Q = tokens.shape[0]
      tokens, positions = tokens.reshape(rows, Q // rows), positions.reshape(rows, Q // rows)  # B = rows
      if manual_tp:
        logits, cache = manual_logits(params, tokens, positions, cache, meta["last_idx"])
        return cache.k_pages, cache.v_pages, logits
      h, _, cache = model.hidden(tokens, positions, cache)  # [B, T, D]
      h = h.reshape(1, Q, h.shape[-1])
      return cache.k_pages, cache.v_pages, model.logits(h[:, meta["last_idx"]])[0]

    def sample_counted(pen, logits, samp):
      out = sample_rows_of(logits, gather_penalty_state(samp, pen))
      return (count_tokens(pen, samp, out[0]),) + tuple(out)

    def step(params, k_pages, v_pages, pen, tokens, positions, meta, samp):
      self.traces += 1  # Python side effect: runs only while tracing
      k_pages, v_pages, logits = hidden_logits(params, k_pages, v_pages, tokens, positions, meta)
      return (k_pages, v_pages) + sample_counted(pen, logits, samp)

    def forward(params, k_pages, v_pages, tokens, positions, meta):
      """step's forward alone (a decode whose grammar masks the host computes meanwhile)."""
      self.traces += 1
      return hidden_logits(params, k_pages, v_pages, tokens, positions, meta)

    def sample(pen, logits, samp):
      """step's sampling alone, on forward's logits: -> (pen, tokens, logprobs, top ids, top logprobs)."""
      self.traces += 1
      return sample_counted(pen, logits, samp)

    def multi(params, k_pages, v_pages, pen, tokens, positions, meta, samp):
      """tokens [R] fed at step 0; positions, slots, kv_lens [steps, R] -> tokens, logprobs [steps, R]."""
      self.traces += 1
      model = mdef.bind(params)
      R = tokens.shape[0]
      no_ragged = jnp.zeros(R + 1, jnp.int32)  # cu_q_lens / num_seqs: unused by decode attention

      def one(carry, xs):
        k_pages, v_pages, tok, samp = carry
        pos, slots, kv_lens = xs
        cache = PagedCache(
          k_pages, v_pages, slots, kv_lens, meta["page_table"], no_ragged, jnp.int32(0), backend=backend, decode=True
        )
        tok2, pos2 = tok.reshape(rows, R // rows), pos.reshape(rows, R // rows)
        if manual_tp:
          logits, cache = manual_logits(params, tok2, pos2, cache, jnp.arange(R))
        else:
          h, _, cache = model.hidden(tok2, pos2, cache)
          logits = model.logits(h.reshape(1, R, h.shape[-1]))[0]  # [R, V]
        out = sample_rows_of(logits, samp)
        # advance: counters, penalty counts and min_tokens move on device between the steps
        return (cache.k_pages, cache.v_pages, out[0], advance(samp, out[0])), out

      xs = (positions, meta["slots"], meta["kv_lens"])
      (k_pages, v_pages, _, _), out = jax.lax.scan(one, (k_pages, v_pages, tokens, gather_penalty_state(samp, pen)), xs)
      return (k_pages, v_pages, count_tokens(pen, samp, out[0])) + tuple(out)

    fn, donate, outs = {
      "forward": (forward, (1, 2), ("pool", "pool", "rep")),
      "sample": (sample, (0,), ("rep",) * 5),
      "multi": (multi, (1, 2, 3), ("pool", "pool") + ("rep",) * 5),
    }.get(mode, (step, (1, 2, 3), ("pool", "pool") + ("rep",) * 5))
    kw = {}
    if pool_sh is not None:
      rep = NamedSharding(mesh, P())
      kw["out_shardings"] = tuple(pool_sh if o == "pool" else rep for o in outs)
    self.fn = jax.jit(fn, donate_argnums=donate, **kw)

  def __call__(self, *args):
    return self.fn(*args)


def step_fn(cfg, attention: str, mode: str, mesh, plan, pool_sh, rows: int, steps: int) -> Step:
  """Shared across engines of one model, so a second engine (another policy, a memory limit via
  max_pages) reuses the compiled steps. (A mesh plan is keyed by its MeshConfig: it holds dicts.)"""
  key = (cfg, attention, mode, mesh, plan.cfg if plan is not None else None, pool_sh, rows, steps)
  if key not in _STEPS:
    if len(_STEPS) >= 64:
      _STEPS.pop(next(iter(_STEPS)))  # oldest first
    _STEPS[key] = Step(cfg, attention, mode, mesh, plan, pool_sh, rows, steps)
  return _STEPS[key]


_STEPS: dict = {}


def mesh_rows(cfg: ModelConfig, mc) -> int:
  """How many rows the ragged token sequence is folded into on this mesh.

  A step's Q tokens form one ragged sequence; the model sees it as [rows, Q/rows]. With rows = dp the
  "batch" dim of every activation shards over dp, so the dense/MoE layers split the tokens over dp
  instead of each dp rank recomputing all of them, and the expert-parallel dispatch
  (jaxllm.parallel.moe), which needs the batch divisible by dp and each dp rank's tokens by tp,
  holds whenever the (power-of-two) buckets are multiples of dp*tp. Attention flattens the rows
  back (PagedCache.attend), so the split never changes which keys a query sees."""
  if mc.pp > 1:
    raise ValueError(
      f"serving runs every layer on each device group; mesh.pp={mc.pp} is not supported "
      "here: use a mesh preset with pp = 1 (e.g. meshes/cpu-8.toml)"
    )
  par = mc.dp * mc.tp
  if par & (par - 1):
    if cfg.is_moe:
      raise ValueError(
        f"serving a MoE over mesh dp*tp={par}: the step buckets are powers of two, so "
        "dp*tp must be one too for the expert-parallel dispatch to split them; "
        "pick a mesh with power-of-two dp and tp"
      )
    return 1  # dense: each dp rank computes every token (replicated), still correct
  return mc.dp
