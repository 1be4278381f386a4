"""Shared-prefix serving benchmark: one generated workload, every engine setting side by side.

Workload (SGLang's few-shot / multi-turn shape): `groups` system prompts, each followed by
`per_group` distinct questions; requests arrive all at once or as a Poisson process, groups
interleaved. The ideal hit rate is what an infinite token-granular cache could reuse: for each
prompt, its longest common prefix with any earlier prompt (at most len - 1: the last token is always
computed to get logits).

Also: decode throughput of the engine against a plain jitted greedy loop over the contiguous
KVCache (jaxllm.model.KVCache) at the same batch and weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model.cache import KVCache
from jaxllm.model.params import model_def
from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams


@dataclass(frozen=True)
class Workload:
  groups: int = 8
  per_group: int = 8
  system_len: int = 128
  question_len: int = 16
  output_len: int = 16
  arrival: str = "all"          # "all" (all at once) or "poisson"
  rate: float = 50.0            # requests per second for poisson
  seed: int = 0


def make_workload(w: Workload, vocab: int):
  """-> (prompts, arrival offsets in seconds), groups interleaved in a shuffled order."""
  rng = np.random.default_rng(w.seed)
  systems = [list(map(int, rng.integers(0, vocab, w.system_len))) for _ in range(w.groups)]
  prompts = [systems[g] + list(map(int, rng.integers(0, vocab, w.question_len)))
             for g in range(w.groups) for _ in range(w.per_group)]
  prompts = [prompts[i] for i in rng.permutation(len(prompts))]
  if w.arrival == "poisson":
    offsets = np.cumsum(rng.exponential(1.0 / w.rate, len(prompts)))
  elif w.arrival == "all":
    offsets = np.zeros(len(prompts))
  else:
    raise ValueError(f"arrival={w.arrival!r}: use 'all' or 'poisson'")
  return prompts, offsets


def ideal_hit_rate(prompts) -> float:
  trie, hit = {}, 0
  for p in prompts:
    node, depth = trie, 0
    while depth < len(p) and p[depth] in node:
      node, depth = node[p[depth]], depth + 1
    hit += min(depth, len(p) - 1)
    node = trie
    for t in p:
      node = node.setdefault(t, {})
  return hit / sum(len(p) for p in prompts)


def run_workload(engine: Engine, prompts, offsets, output_len: int) -> dict:
  """Feed requests at their arrival times, step until all finish, return metrics."""
  sp = SamplingParams(max_tokens=output_len)
  t0 = time.perf_counter()
  radix0 = engine.sched.tree.seconds
  pending, reqs = list(range(len(prompts))), []
  while pending or not engine.idle:
    now = time.perf_counter() - t0
    while pending and offsets[pending[0]] <= now:
      i = pending.pop(0)
      reqs.append(engine.add_request(prompts[i], sp, arrival=t0 + offsets[i]))
    if engine.idle:
      time.sleep(max(0.0, offsets[pending[0]] - now))
      continue
    engine.step()
  wall = time.perf_counter() - t0
  engine.sched.check()
  ttft = np.array([r.token_times[0] - r.arrival for r in reqs])
  itl = np.concatenate([np.diff(r.token_times) for r in reqs])
  pct = lambda a, q: float(np.percentile(a, q)) * 1e3 if len(a) else float("nan")
  return {"hit": sum(r.cache_hit for r in reqs) / sum(len(r.prompt) for r in reqs),
          "prefill": sum(r.computed for r in reqs),
          "tok_s": sum(len(r.output) for r in reqs) / wall,
          **{f"ttft_p{q}": pct(ttft, q) for q in (50, 90, 99)},
          **{f"itl_p{q}": pct(itl, q) for q in (50, 90, 99)},
          "radix": (engine.sched.tree.seconds - radix0) / wall,
          "preempt": engine.sched.num_preemptions, "wall": wall}


def plain_decode_tokens_per_s(cfg, params, batch: int, prompt_len: int, steps: int) -> float:
  """Baseline: a jitted one-token greedy step over the contiguous KVCache, looped from Python."""
  mdef = model_def(cfg)

  @jax.jit
  def prefill(params, tokens):
    cache = KVCache.init(cfg, batch, prompt_len + steps + 1)
    out = mdef.bind(params)(tokens, cache=cache)
    return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.cache

  @jax.jit
  def step(params, tok, cache):
    out = mdef.bind(params)(tok[:, None], cache=cache)
    return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.cache

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
  tok, cache = prefill(params, tokens)
  tok, cache = jax.block_until_ready(step(params, tok, cache))     # compile outside the timing
  t0 = time.perf_counter()
  for _ in range(steps - 1):
    tok, cache = step(params, tok, cache)
  np.asarray(tok)
  return batch * (steps - 1) / (time.perf_counter() - t0)


def engine_decode_tokens_per_s(engine: Engine, batch: int, prompt_len: int, steps: int) -> float:
  rng = np.random.default_rng(0)
  prompts = [list(map(int, rng.integers(0, engine.cfg.vocab_size, prompt_len))) for _ in range(batch)]
  engine.generate(prompts, SamplingParams(max_tokens=2))          # compile the decode bucket
  s0, n0 = engine.step_seconds["decode"], engine.step_tokens["decode"]
  engine.generate([p[::-1] for p in prompts], SamplingParams(max_tokens=steps))
  return (engine.step_tokens["decode"] - n0) / (engine.step_seconds["decode"] - s0)


COLUMNS = [("setting", 22, "<22"), ("hit%", 6, ">6.1f"), ("ideal%", 6, ">6.1f"), ("prefill", 7, ">7d"),
           ("tok/s", 7, ">7.0f"), ("ttft50ms", 8, ">8.0f"), ("ttft90ms", 8, ">8.0f"), ("ttft99ms", 8, ">8.0f"),
           ("itl50ms", 7, ">7.1f"), ("itl90ms", 7, ">7.1f"), ("itl99ms", 7, ">7.1f"), ("radix%", 6, ">6.2f"),
           ("preempt", 7, ">7d")]


def format_row(name: str, m: dict, ideal: float) -> str:
  vals = [name, 100 * m["hit"], 100 * ideal, m["prefill"], m["tok_s"], m["ttft_p50"], m["ttft_p90"],
          m["ttft_p99"], m["itl_p50"], m["itl_p90"], m["itl_p99"], 100 * m["radix"], m["preempt"]]
  return " ".join(format(v, spec) for (_, _, spec), v in zip(COLUMNS, vals))


def header() -> str:
  return " ".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w, _) in enumerate(COLUMNS))


def run_bench(cfg, params, w: Workload, *, page_size=16, max_running=16, chunk_size=256,
              mem_pages: int | None = None, attention="reference", decode_batch=16, mesh=None, plan=None,
              log=print):
  """Every setting on one workload in one process; returns {setting: metrics}."""
  prompts, offsets = make_workload(w, cfg.vocab_size)
  ideal = ideal_hit_rate(prompts)
  per_req = -(-(w.system_len + w.question_len + w.output_len) // page_size)
  num_pages = max_running * per_req + w.groups * (w.system_len // page_size) + 8   # every prefix fits
  sys_pages = w.system_len // page_size
  # Room for the running requests' own pages and half the system prompts: forces eviction.
  mem_pages = mem_pages or max_running * (per_req - sys_pages) + max(1, w.groups // 2) * sys_pages
  maxp = 1 << (-(-cfg.max_seq_len // page_size) - 1).bit_length()
  common = dict(page_size=page_size, num_pages=num_pages, max_running=max_running, chunk_size=chunk_size,
                attention=attention, min_seqs=max_running, min_pages=maxp, mesh=mesh, plan=plan,
                min_tokens=1 << (chunk_size + max_running - 1).bit_length())  # one bucket: 2 compiles
  settings = [("cache off", dict(radix=False))]
  settings += [(f"cache on  {p}", dict(policy=p)) for p in ("fcfs", "lpm", "dfs-weight")]
  settings += [(f"mem {mem_pages}p {p}", dict(policy=p, max_pages=mem_pages)) for p in ("fcfs", "lpm", "dfs-weight")]
  warm = Engine(cfg, params, **common)
  warm.generate(prompts[:2], SamplingParams(max_tokens=2))         # compile both steps once
  log(f"workload: {w}; {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens; "
      f"pool {num_pages} pages of {page_size}, memory-limited runs {mem_pages}"
      + (f"; mesh dp={plan.cfg.dp} tp={plan.cfg.tp} ep={plan.cfg.ep}" if mesh is not None else ""))
  log(header())
  results = {}
  for name, kw in settings:
    eng = Engine(cfg, params, **{**common, **kw})
    results[name] = m = run_workload(eng, prompts, offsets, w.output_len)
    log(format_row(name, m, ideal))
  assert warm.compiles == 2, f"benchmark recompiled: {warm.compiles} step compilations (expected 2)"
  base, on = results["cache off"], results["cache on  fcfs"]
  log(f"cache on vs off (fcfs): throughput x{on['tok_s'] / base['tok_s']:.2f}, "
      f"median TTFT x{base['ttft_p50'] / on['ttft_p50']:.2f} lower, hit rate "
      f"{100 * on['hit'] / ideal:.1f}% of ideal")
  eng = Engine(cfg, params, **common)
  ours = engine_decode_tokens_per_s(eng, decode_batch, w.system_len, 32)
  plain = plain_decode_tokens_per_s(cfg, params, decode_batch, w.system_len, 32)
  log(f"decode throughput at batch {decode_batch}, context {w.system_len}: engine {ours:.0f} tok/s, "
      f"plain jitted KVCache loop {plain:.0f} tok/s (x{ours / plain:.2f})")
  results["decode"] = {"engine": ours, "plain": plain}
  return results
