"""The serving engine: scheduler + radix cache + page pool + jitted step functions.

Each `step()` asks the scheduler for (request, n tokens) pairs, packs them into one ragged row with
numpy metadata (positions, slots in the page pool, kv_lens, page table, cu_q_lens), pads it to a
bucketed shape and runs one of the jitted functions: `decode` when every sequence computes exactly its
last token (paged decode attention), `ragged` otherwise (prefill chunks and decodes mixed; its
q_len-1 sequences are sorted last and take the decode attention, the rest the ragged one, see
PagedCache). Both run the shared model with the paged cache, take the logits of each sequence's last
row and sample on device; the pool is donated. Buckets: decode per power-of-two sequence count R,
ragged per power-of-two token count Q with R = min(Q, max R) (a sequence has at least one token), and
one fixed page-table width M (the attention walks only live pages). So after warm-up nothing compiles
(`compiles` counts traces), and warm-up compiles a few dozen shapes, not sequences x pages x tokens.

Multi-step decode (vLLM's multi-step scheduling, JetStream's generate loop): when a step is pure
decode, a third function `multi` runs `decode_steps` decode steps in one call -- a lax.scan that feeds
each step's sampled tokens to the next on device -- and returns to the host once. The host allocates
the pages of every row's next k_i <= decode_steps tokens beforehand (k_i stops at max_tokens, so
nothing runs past a request's length; a row done early writes only the null page until the scan
ends), then commits the tokens one by one and truncates a row at its first stop token/string,
discarding the rest (their K/V sits past num_computed in pages the request releases). Per-call
dispatch, metadata upload and the host loop are paid once per decode_steps tokens instead of once per
token; new requests wait at most one chunk to be admitted.

Overlap (SGLang's overlap scheduler, `serve.overlap`): see `step`. A pure decode step whose rows all go
on is launched behind the one still running, fed its sampled tokens on the device; the host commits
the earlier one while the device computes.

Shapes: the package legend in jaxllm/__init__.py (R, Q, M, Z, n, V); the model sees a step's Q tokens
as B = `rows` rows of T = Q / rows. The jitted step functions themselves: jaxllm.serve.steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.buckets import pow2_bucket
from jaxllm.config import ModelConfig, ServeConfig, check_invariant_mesh
from jaxllm.model import hooks, invariant
from jaxllm.model.params import model_def
from jaxllm.parallel import mesh_hooks
from jaxllm.parallel.sharding import logical_spec, param_shardings
from jaxllm.serve.detok import TextStream
from jaxllm.serve.grammar import GrammarCompiler
from jaxllm.serve.paged_cache import POOL_AXES, pool_shape
from jaxllm.serve.penalties import PenaltySlots
from jaxllm.serve.sampling import (
  SamplingParams,
  build_sampling_arrays,
  with_random_seed,
)
from jaxllm.serve.scheduler import Req, Scheduler
from jaxllm.serve.steps import mesh_rows, step_fn
from jaxllm.serve.structured import GrammarRows


@dataclass
class Result:
  rid: int
  prompt: list
  output: list
  logprobs: list
  finish_reason: str
  cache_hit: int  # prompt tokens reused from the radix cache at first admission
  ttft: float  # seconds from arrival to the first generated token
  token_times: list  # wall time of each generated token


class Engine:
  def __init__(
    self,
    cfg: ModelConfig,
    params,
    serve: ServeConfig | None = None,
    *,
    mesh=None,
    plan=None,
    weight_version=0,
    detokenize=None,
    tokenizer=None,
    **overrides,
  ):
    """Serve `cfg`'s model with `params` under ServeConfig `serve` (keywords override its fields,
    e.g. Engine(cfg, params, page_size=8)). weight_version namespaces the radix cache; detokenize
    (token ids -> text) is needed for stop strings; tokenizer (jaxllm.data) for structured output
    (SamplingParams.grammar), and its decode is the default detokenize."""
    try:
      serve = dataclasses.replace(serve or ServeConfig(), **overrides)
    except TypeError as e:
      raise ValueError(f"unknown engine setting: {e}; the settings are ServeConfig's fields") from None
    self.serve = sc = serve
    if sc.deterministic or cfg.batch_invariant:
      cfg = deterministic_model(cfg, sc, plan)
    self.decode_steps = sc.decode_steps
    self.min_seqs, self.min_tokens = sc.min_seqs, sc.min_tokens
    self.cfg, self.page_size, self.detokenize = cfg, sc.page_size, detokenize
    if detokenize is None and tokenizer is not None:
      self.detokenize = tokenizer.decode
    self.tokenizer = tokenizer
    self.mdef = model_def(cfg)
    self.sched = Scheduler.from_config(sc)
    self.sched.version = weight_version
    self.M = -(-cfg.max_seq_len // sc.page_size)  # page-table width: max_seq_len's pages, fixed
    self.mesh, self.plan = mesh, plan
    self._rows = GrammarRows(tokenizer, cfg.vocab_size, mesh)  # structured output (SamplingParams.grammar)
    self.rows = 1
    if mesh is not None:
      self.rows = mesh_rows(cfg, plan.cfg)
      # Every bucket must split into dp*tp equal parts (rows over dp, the MoE token slices over tp).
      par = plan.cfg.dp * plan.cfg.tp if self.rows > 1 or cfg.is_moe else 1
      self.min_seqs, self.min_tokens = pow2_bucket(max(sc.min_seqs, par), 1), pow2_bucket(max(sc.min_tokens, par), 1)
    dtype = jnp.dtype(cfg.dtype)
    shape = pool_shape(cfg, sc.num_pages, sc.page_size)
    if mesh is not None:
      params = jax.device_put(params, param_shardings(self.mdef, mesh, plan))
      self._pool_sh = NamedSharding(mesh, logical_spec(plan, POOL_AXES, shape))
      self.k_pages = jax.device_put(jnp.zeros(shape, dtype), self._pool_sh)
      self.v_pages = jax.device_put(jnp.zeros(shape, dtype), self._pool_sh)
    else:
      self._pool_sh = None
      self.k_pages, self.v_pages = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    self.params = params
    self.R_max = pow2_bucket(sc.max_running, self.min_seqs)
    # Penalty state on device (jaxllm.serve.penalties): a slot per penalised request in a batch.
    self.pen = PenaltySlots(self.R_max, cfg.vocab_size, NamedSharding(mesh, P()) if mesh is not None else None)
    self.overlap = sc.overlap
    self._inflight: _Launch | None = None  # the launched step not yet committed (overlap)
    self.wait_seconds = 0.0  # time the host waited for device results
    self.chained = 0  # launches planned while the previous step ran (overlap)
    self._fns = {
      mode: step_fn(
        cfg, sc.attention, mode, mesh, plan, self._pool_sh, self.rows, sc.decode_steps if mode == "multi" else 1
      )
      for mode in ("ragged", "decode")
      + (("multi",) if sc.decode_steps > 1 else ())
      # grammar rows' decodes, chained (see _chain); a grammar needs the tokenizer
      + (("forward", "sample") if sc.overlap and tokenizer is not None else ())
    }
    self._rids = itertools.count()
    self.finished: list[Req] = []

  @property
  def stats(self):
    """Monotonic counters (jaxllm.serve.scheduler.Stats): prompt/cached/generated tokens, ..."""
    return self.sched.stats

  @property
  def weight_version(self):
    return self.sched.version

  def _call(self, mode: str, *args):
    if self.mesh is None:
      return self._fns[mode](*args)
    with jax.set_mesh(self.mesh), hooks.using(**mesh_hooks(self.mesh, self.plan, self.cfg)):
      return self._fns[mode](*args)

  def _run(self, mode: str, *args):
    return self._call(mode, self.params, self.k_pages, self.v_pages, self.pen.store, *args)

  @property
  def compiles(self) -> int:
    """Compiled shapes of this engine's step functions (shared by engines of the same model)."""
    return sum(f.traces for f in self._fns.values()) + self.pen.traces

  # ---- requests -----------------------------------------------------------------------------
  def check_request(self, prompt, sp: SamplingParams) -> list[int]:
    """The prompt as ints, or ValueError naming what makes this request impossible to run (any
    thread may call this: it reads only settings)."""
    prompt = [int(t) for t in prompt]
    if not prompt:
      raise ValueError("empty prompt: a request needs at least one token")
    if bad := [t for t in prompt if not 0 <= t < self.cfg.vocab_size]:
      raise ValueError(f"prompt token ids {bad[:5]} are outside the model vocab 0..{self.cfg.vocab_size - 1}")
    total = len(prompt) + sp.max_tokens
    if total > self.cfg.max_seq_len:
      raise ValueError(
        f"prompt ({len(prompt)}) + max_tokens ({sp.max_tokens}) = {total} exceeds "
        f"model.max_seq_len={self.cfg.max_seq_len}; shorten the prompt or lower max_tokens"
      )
    if -(-total // self.page_size) > self.sched.alloc.total:
      raise ValueError(
        f"a {total}-token request needs {-(-total // self.page_size)} KV pages but the pool "
        f"has {self.sched.alloc.total}; raise serve.num_pages/serve.max_pages"
      )
    if sp.stop and self.detokenize is None:
      raise ValueError("stop strings need a detokenizer: pass detokenize= (token ids -> text) to the Engine")
    sp.check_vocab(self.cfg.vocab_size)
    if sp.grammar is not None:
      self.grammars.compile(sp.grammar)  # compiled (and cached) here, on the submitting thread
    return prompt

  @property
  def grammars(self) -> GrammarCompiler:
    """The structured-output grammars of this engine's tokenizer (built on first use)."""
    return self._rows.compiler

  def add_request(
    self, prompt, sp: SamplingParams = SamplingParams(), arrival: float | None = None, streaming: bool = False
  ) -> Req:
    """Queue a request (token ids in). Raises ValueError, naming the problem, for one that can never
    run. The weight version (radix namespace) is bound when it is admitted, not here. streaming: a
    client reads its tokens as they come (see _steps_per_call)."""
    prompt = self.check_request(prompt, sp)
    sp = with_random_seed(sp)  # no seed: a fresh random one, so users' samples differ
    arrival = time.perf_counter() if arrival is None else arrival
    req = Req(next(self._rids), prompt, sp, arrival=arrival, streaming=streaming)
    if self.detokenize is not None:
      req.stream = TextStream(
        self.detokenize,
        sp.stop,
        prompt_ids=prompt,
        skip_special_tokens=sp.skip_special_tokens,
        include_stop_str_in_output=sp.include_stop_str_in_output,
        min_tokens=sp.min_tokens,
      )
    if sp.grammar is not None:
      self._rows.start(req)
    self.sched.add(req)
    return req

  def abort(self, req: Req) -> bool:
    """Cancel a waiting or running request (call between steps). Its pages are released and its
    computed prefix stays in the radix cache. False if it had already finished."""
    if req.finish_reason is not None:
      return False
    req.finish_reason = "abort"
    self._rows.drop(req)
    self.sched.abort(req)
    return True

  def set_weights(self, params, version) -> None:
    """Swap weights (RL; call between steps). The version is the radix namespace, bound when a
    request is admitted: requests admitted from now on match only KV computed by these weights, and
    running requests are preempted so their KV is recomputed with them (nothing computed by the old
    weights is served again)."""
    if version == self.sched.version:
      raise ValueError(f"weight version {version!r} is already in use; give each set_weights a new version")
    self.finished += self.drain()  # the step in flight ran on the old weights: commit it first
    if self.mesh is not None:
      params = jax.device_put(params, param_shardings(self.mdef, self.mesh, self.plan))
    self.params = params
    self.sched.set_version(version)

  def flush_cache(self) -> bool:
    """Drop every cached prefix (SGLang /flush_cache). Only when nothing runs; False otherwise."""
    if not self.idle:
      return False
    self.sched.flush()
    return True

  def gauges(self) -> dict:
    """Live values: requests running and waiting, KV pages in use (held by requests or the cache)."""
    alloc = self.sched.alloc
    return {
      "running": len(self.sched.running),
      "waiting": len(self.sched.waiting),
      "pages_total": alloc.total,
      "pages_used": alloc.total - alloc.num_free,
      "pages_evictable": self.sched.tree.evictable if self.sched.radix_on else 0,
    }

  @property
  def idle(self) -> bool:
    return not self.sched.waiting and not self.sched.running and self._inflight is None

  # ---- the loop -----------------------------------------------------------------------------
  def step(self) -> list[Req]:
    """One scheduling step; returns the requests that finished in it.

    Without overlap: schedule, launch, wait, commit. With overlap (SGLang's overlap scheduler): the
    step launched last time is still running on the device when this one starts; if it was a pure
    decode whose rows all go on, the next decode is planned and launched right behind it (its input
    tokens are the running step's sampled tokens, still on the device), and only then does the host
    wait for and commit the earlier step -- so commit and planning run while the device computes.
    Stops are thereby seen one step late: a row that stopped gets one more step whose tokens are
    dropped (its K/V lands past its length, in pages it released; the device runs steps in order,
    so a reused page is rewritten after that). Penalised rows chain too: their token counts live on
    device (jaxllm.serve.penalties) and are advanced there by the sampled tokens. Anything else
    (admissions, prefill, preemption, length limits) takes the plain path after the commit.

    A batch with grammar rows chains too, as a forward launched behind prev and a sampling launched
    after prev's commit: the host computes the next grammar masks from prev's tokens while the device
    runs the forward (XGrammar's overlap of mask generation with the LLM's computation)."""
    prev, self._inflight = self._inflight, None
    nxt = self._chain(prev) if prev is not None else None
    done = self._collect(prev) if prev is not None else []
    if nxt is not None and nxt.logits is not None:
      self._sample(nxt)  # grammar rows: their masks followed from prev's tokens in _collect
    if nxt is None:
      nxt = self._launch_scheduled()
      if nxt is not None and not self.overlap:
        done += self._collect(nxt)
        nxt = None
    self._inflight = nxt
    return done

  def _launch_scheduled(self) -> _Launch | None:
    """Ask the scheduler for a batch and launch it (multi-step when it is pure decode)."""
    batch = self.sched.schedule()
    if not batch:
      if self.sched.waiting and not self.sched.running:
        raise RuntimeError("scheduler made no progress with an empty running set (pool too small?)")
      return None
    decode = all(n == 1 and r.remaining == 1 for r, n in batch)
    steps = 1 if self._rows.structured(batch) else self._steps_per_call(batch)  # a grammar's mask needs the host
    if decode and steps > 1 and not any(r.prefilling for r, _ in batch):
      ks = self.sched.grow_decode(batch, steps)
      if max(ks) > 1:
        return self._launch_decode(batch, ks, [0] * len(batch), None)
    if decode:
      return self._launch_decode(batch, None, [0] * len(batch), None)
    return self._launch_ragged(batch)

  def _steps_per_call(self, batch) -> int:
    """Decode steps of the next call: decode_steps, or 1 while a streaming client waits in the batch
    (a k-step call hands its tokens over at once: a stream would get them in bursts of k) unless
    serve.stream_multistep."""
    if self.decode_steps > 1 and not self.serve.stream_multistep and any(r.streaming for r, _ in batch):
      return 1
    return self.decode_steps

  def _chain(self, prev: _Launch) -> _Launch | None:
    """The decode step right after `prev` (still running), or None when it cannot be planned before
    prev's tokens are known (see step)."""
    if not self.overlap or prev.mode == "ragged":
      return None
    sched, batch = self.sched, prev.batch
    if len(batch) != len(sched.running) or (sched.waiting and len(sched.running) < sched.max_running):
      return None  # someone was aborted, or a request may be admitted
    ahead = prev.ks or [1] * len(batch)  # tokens prev adds to each row (if none stops)
    for (r, _), a in zip(batch, ahead):
      if r.finish_reason or len(r.output) + a >= r.sp.max_tokens:
        return None
      if not self.pen.current(r, len(r.output) + a):
        return None  # its device penalty state would need the ids in flight: rebuilt on the plain path
    structured = self._rows.structured(batch)  # a grammar's next mask needs the host: one step per call
    steps = 1 if structured else self._steps_per_call(batch)
    ks = sched.grow_decode(batch, steps, ahead)
    if min(ks) < 1:
      return None  # out of pages: the plain path preempts
    self.chained += 1
    return self._launch_decode(batch, ks if steps > 1 else None, ahead, prev, split=structured)

  def _launch_decode(self, batch, ks, ahead, prev: _Launch | None, split: bool = False) -> _Launch:
    """A decode launch: one step ("decode", ks None) or decode_steps steps ("multi"); row i keeps at
    most ks[i] tokens (see module doc). ahead[i]: tokens of row i still in flight in `prev`, whose
    sampled tokens (on device) are fed here instead of the host's last output. split: launch only the
    forward; _sample launches the sampling (one step)."""
    Z, live = self.page_size, len(batch)
    R = pow2_bucket(live, self.min_seqs)
    n = self.decode_steps if ks is not None else 1
    k = np.asarray(ks if ks is not None else [1] * live, np.int32)
    page_table = self._page_table(batch, R)
    start = np.asarray([r.num_computed + a for (r, _), a in zip(batch, ahead)], np.int32)  # fed token's position
    j = np.arange(n, dtype=np.int32)[:, None]
    pos = start[None, :] + np.minimum(j, k[None, :] - 1)  # [n, live] done rows stay put
    slots = page_table[np.arange(live), pos // Z] * Z + pos % Z
    slots = np.where(j < k[None, :], slots, 0)  # done rows write the null page
    pad = lambda a: np.pad(a, ((0, 0), (0, R - live))).astype(np.int32)
    if prev is None:
      tokens = np.zeros(R, np.int32)
      tokens[:live] = [r.token_slice(r.num_computed, r.num_computed + 1)[0] for r, _ in batch]
    else:
      tokens = _last_tokens(prev.out[0], np.asarray([a - 1 for a in ahead] + [0] * (R - live), np.int32))
    # Sampling state as of the fed token: counters and min_tokens count prev's tokens too. Only their
    # number is known; a range stands in for them (penalty counts are on device, counted there).
    samp = self._samp(batch, R, ahead, list(k) if ks is not None else [1] * live)
    if ks is None:
      meta = {
        "slots": pad(slots)[0],
        "kv_lens": pad(pos + 1)[0],
        "page_table": page_table,
        "cu_q_lens": np.arange(R + 1, dtype=np.int32),
        "num_seqs": np.int32(live),
        "last_idx": np.arange(R, dtype=np.int32),
      }
      return self._launch("decode", batch, None, tokens, pad(pos)[0], meta, samp, split)
    meta = {"slots": pad(slots), "kv_lens": pad(pos + 1), "page_table": page_table}
    return self._launch("multi", batch, list(ks), tokens, pad(pos), meta, samp)

  def _launch_ragged(self, batch) -> _Launch:
    """Prefill chunks and decode rows in one ragged step; q_len > 1 rows first (they take the ragged
    attention, the rest the decode one)."""
    Z = self.page_size
    batch = [b for b in batch if b[1] > 1] + [b for b in batch if b[1] == 1]
    Q = pow2_bucket(sum(n for _, n in batch), self.min_tokens)
    R = max(self.min_seqs, min(Q, self.R_max))  # tied to Q: a sequence has >= 1 token (fewer compiles)
    tokens, positions = np.zeros(Q, np.int32), np.zeros(Q, np.int32)
    slots = np.zeros(Q, np.int32)  # padding rows write into the null page 0
    kv_lens, last_idx = np.zeros(R, np.int32), np.zeros(R, np.int32)
    page_table = self._page_table(batch, R)
    cu = np.zeros(R + 1, np.int32)
    t = 0
    for i, (r, n) in enumerate(batch):
      pos = np.arange(r.num_computed, r.num_computed + n, dtype=np.int32)
      tokens[t : t + n] = r.token_slice(r.num_computed, r.num_computed + n)
      positions[t : t + n] = pos
      slots[t : t + n] = page_table[i, pos // Z] * Z + pos % Z
      kv_lens[i] = r.num_computed + n
      t += n
      cu[i + 1], last_idx[i] = t, t - 1
    cu[len(batch) + 1 :] = t
    n_multi = sum(n > 1 for _, n in batch)
    dec_rows = np.full(R, Q, np.int32)
    dec_rows[n_multi : len(batch)] = last_idx[n_multi : len(batch)]
    meta = {
      "slots": slots,
      "kv_lens": kv_lens,
      "page_table": page_table,
      "cu_q_lens": cu,
      "num_seqs": np.int32(len(batch)),
      "last_idx": last_idx,
      "num_multi": np.int32(n_multi),
      "dec_rows": dec_rows,
    }
    keeps = [int(n == r.remaining) for r, n in batch]  # a prompt chunk short of the end samples nothing kept
    return self._launch("ragged", batch, None, tokens, positions, meta, self._samp(batch, R, [0] * len(batch), keeps))

  def _page_table(self, batch, R: int) -> np.ndarray:
    """[R, M] page ids, M fixed (the attention walks only live pages), padded with the null page."""
    table = np.zeros((R, self.M), np.int32)
    for i, (r, _) in enumerate(batch):
      table[i, : len(r.pages)] = r.pages
    return table

  def _samp(self, batch, R: int, ahead, keeps) -> dict:
    """Per-row sampling arrays of a launch; penalised rows get their slot of the device penalty store
    (PenaltySlots.slots). ahead[i]: row i's tokens in flight; keeps[i]: how many of its sampled tokens
    the host will keep."""
    slots = self.pen.slots(batch, ahead, keeps)
    hist = [(r.prompt, range(len(r.output) + a) if a else r.output) for (r, _), a in zip(batch, ahead)]
    return build_sampling_arrays([r.sp for r, _ in batch], hist, R, pen_slots=slots, pen_steps=keeps)

  def _launch(self, mode, batch, ks, tokens, positions, meta, samp, split: bool = False) -> _Launch:
    """Dispatch a step function (asynchronous: returns before the device finishes). split: only the
    forward of a decode; the launch's outputs come from _sample."""
    if split:
      self.k_pages, self.v_pages, logits = self._call(
        "forward", self.params, self.k_pages, self.v_pages, tokens, positions, meta
      )
      return _Launch(mode, batch, ks, (), logits, samp)
    samp = samp | {"grammar_mask": self._rows.masks(batch, len(samp["temperature"]))}
    self.k_pages, self.v_pages, self.pen.store, *out = self._run(mode, tokens, positions, meta, samp)
    return _Launch(mode, batch, ks, tuple(out))

  def _sample(self, launch: _Launch) -> None:
    """Launch the sampling of a split decode with its rows' grammar masks as they are now."""
    samp = launch.samp | {"grammar_mask": self._rows.masks(launch.batch, len(launch.samp["temperature"]))}
    self.pen.store, *out = self._call("sample", self.pen.store, launch.logits, samp)
    launch.out, launch.logits, launch.samp = tuple(out), None, None

  def _collect(self, launch: _Launch) -> list[Req]:
    """Wait for a launch's results and commit them; rows whose request finished meanwhile (stopped
    one step earlier, or aborted) are dropped."""
    t0 = time.perf_counter()
    toks, logps, top_ids, top_lps = map(np.asarray, launch.out)
    now = time.perf_counter()
    self.wait_seconds += now - t0
    keep = [i for i, (r, _) in enumerate(launch.batch) if r.finish_reason is None]
    batch = [launch.batch[i] for i in keep]
    if launch.mode == "multi":
      pick = lambda a: a[:, keep]
      done = self.sched.commit_multi(
        batch, [launch.ks[i] for i in keep], pick(toks), pick(logps), now, (pick(top_ids), pick(top_lps))
      )
    else:
      pick = lambda a: a[keep]
      done = self.sched.commit(batch, pick(toks), pick(logps), now, (pick(top_ids), pick(top_lps)))
    if self._rows:
      done += self._rows.advance(batch, done, self.sched.finish)
    self.finished += done
    return done

  def drain(self) -> list[Req]:
    """Wait for and commit the step still in flight (overlap); returns the requests it finished."""
    prev, self._inflight = self._inflight, None
    return self._collect(prev) if prev is not None else []

  def run(self) -> list[Req]:
    """Step until every queued request finished."""
    out = []
    while not self.idle:
      out += self.step()
    return out

  def generate(self, prompts, sp: SamplingParams | list = SamplingParams()) -> list[Result]:
    """Offline batch generation; results in prompt order."""
    sps = sp if isinstance(sp, list) else [sp] * len(prompts)
    reqs = [self.add_request(p, s) for p, s in zip(prompts, sps)]
    self.run()
    return [result(r) for r in reqs]

  def warmup(self) -> int:
    """Compile every step shape a run can reach; returns compiles done. The shapes: decode, its
    split forward + sampling (overlap) and multi-step decode per sequences bucket R, ragged per
    tokens bucket Q (its R follows from Q, and the page-table width is fixed), and the penalty-store
    fill. Sampling arrays have widths fixed by R alone (sampling.build_sampling_arrays), so no
    request field adds a shape. Runs on metadata that only writes the null page."""
    self.drain()
    before = self.compiles
    Q_max = pow2_bucket(max(self.sched.chunk_size, self.sched.max_running), self.min_tokens)  # a step's tokens at most
    sizes = lambda lo, hi: [1 << k for k in range(lo.bit_length() - 1, hi.bit_length())]
    z = lambda *s: np.zeros(s, np.int32)
    shapes = [("decode", R, R) for R in sizes(self.min_seqs, self.R_max)]
    shapes += [("multi", R, R) for R in sizes(self.min_seqs, self.R_max) if "multi" in self._fns]
    shapes += [("ragged", max(self.min_seqs, min(Q, self.R_max)), Q) for Q in sizes(self.min_tokens, Q_max)]
    for mode, R, Q in shapes:
      meta = {
        "slots": z(Q),
        "kv_lens": z(R),
        "page_table": z(R, self.M),
        "cu_q_lens": z(R + 1),
        "num_seqs": np.int32(0),
        "last_idx": z(R),
      }
      if mode == "ragged":
        meta |= {"num_multi": np.int32(0), "dec_rows": np.full(R, Q, np.int32)}
      tokens, positions = z(Q), z(Q)
      if mode == "multi":
        n = self.decode_steps
        meta = {"slots": z(n, R), "kv_lens": z(n, R), "page_table": z(R, self.M)}
        positions = z(n, R)
      self._launch(mode, [], None, tokens, positions, meta, self._samp([], R, [], []))
      if mode == "decode" and "forward" in self._fns:  # a grammar batch's chained decode, split in two
        self._sample(self._launch(mode, [], None, tokens, positions, meta, self._samp([], R, [], []), split=True))
    self.pen.warmup()  # the penalty-store fill: one shape
    jax.block_until_ready(self.k_pages)
    return self.compiles - before


def deterministic_model(cfg: ModelConfig, sc: ServeConfig, plan=None) -> ModelConfig:
  """cfg in batch-invariant arithmetic for serve.deterministic (jaxllm.model.invariant), checked."""
  if plan is not None:
    check_invariant_mesh(cfg, plan.cfg)
  if sc.page_size % invariant.BLOCK:
    raise ValueError(
      f"serve.deterministic=true needs serve.page_size to be a multiple of {invariant.BLOCK} (the "
      f"attention's key block), got {sc.page_size}"
    )
  return dataclasses.replace(cfg, batch_invariant=True)


@dataclass
class _Launch:
  """A dispatched step: what it computes and its (possibly not yet ready) device outputs."""

  mode: str  # "ragged", "decode" or "multi"
  batch: list  # [(Req, tokens computed)]
  ks: list | None  # multi: tokens row i may keep
  out: tuple  # device arrays: sampled tokens, logprobs, top-20 ids, top-20 logprobs
  logits: object = None  # a split decode whose sampling is not launched yet: its logits [R, V] ...
  samp: dict | None = None  # ... and sampling arrays (without the grammar masks)


@jax.jit
def _last_tokens(toks, idx):
  """The token each row sampled last in a launch still on the device: toks [R] (one step, idx
  ignored) or [n, R] (multi-step: row i's is toks[idx[i], i])."""
  if toks.ndim == 1:
    return toks
  return toks[idx, jnp.arange(toks.shape[1])]


def result(r: Req) -> Result:
  ttft = r.token_times[0] - r.arrival if r.token_times else float("nan")
  return Result(
    r.rid, r.prompt, list(r.output), list(r.logprobs), r.finish_reason, r.cache_hit, ttft, list(r.token_times)
  )
