"""Shared-prefix serving benchmark: one generated workload, every engine setting side by side.

Workload (SGLang's few-shot / multi-turn shape): `groups` system prompts, each followed by
`per_group` distinct questions; requests arrive all at once or as a Poisson process, groups
interleaved. The ideal hit rate is what an infinite token-granular cache could reuse: for each
prompt, its longest common prefix with any earlier prompt (at most len - 1: the last token is always
computed to get logits).

Also: decode throughput side by side at one batch and context: the engine (multi-step decode),
the plain jitted generate loop over the contiguous KVCache (jaxllm.model.generate: one XLA program
for every step) and Hugging Face transformers `generate` (greedy, fp32, the same weights written by
jaxllm.io.export_hf). Plain and HF are timed as (time for 1 + steps new tokens) - (time for 1), so
prefill cancels; the engine over its decode phase (engine_decode_tokens_per_s).

Shapes: the package legend in jaxllm/__init__.py (B, n, M).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ServeConfig
from jaxllm.model.generate import generate as plain_generate
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
  arrival: str = "all"  # "all" (all at once) or "poisson"
  rate: float = 50.0  # requests per second for poisson
  seed: int = 0


def make_workload(w: Workload, vocab: int):
  """-> (prompts, arrival offsets in seconds), groups interleaved in a shuffled order."""
  rng = np.random.default_rng(w.seed)
  systems = [list(map(int, rng.integers(0, vocab, w.system_len))) for _ in range(w.groups)]
  prompts = [
    systems[g] + list(map(int, rng.integers(0, vocab, w.question_len)))
    for g in range(w.groups)
    for _ in range(w.per_group)
  ]
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
  # Time per output token after the first, per request: multi-step decode hands serve.decode_steps
  # tokens to the host at once, so gaps between single tokens (mostly 0 inside a chunk) would say
  # nothing; the per-request mean is what a streaming client sees on average.
  tpot = np.array(
    [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in reqs if len(r.token_times) > 1]
  )
  pct = lambda a, q: float(np.percentile(a, q)) * 1e3 if len(a) else float("nan")
  return {
    "hit": sum(r.cache_hit for r in reqs) / sum(len(r.prompt) for r in reqs),
    "prefill": sum(r.computed for r in reqs),
    "tok_s": sum(len(r.output) for r in reqs) / wall,
    **{f"ttft_p{q}": pct(ttft, q) for q in (50, 90, 99)},
    **{f"tpot_p{q}": pct(tpot, q) for q in (50, 90, 99)},
    "radix": (engine.sched.tree.seconds - radix0) / wall,
    "preempt": engine.sched.num_preemptions,
    "wall": wall,
  }


def decode_prompts(vocab: int, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, prompt_len)).astype(np.int32)


def _decode_rate(run, batch: int, steps: int, reps: int = 2) -> tuple[float, np.ndarray]:
  """run(n) -> [B, n] new tokens (B = batch). Decode tokens/s from the best of `reps` (time(1 + steps) -
  time(1)) pairs -- prefill and per-call setup cancel -- and the tokens of the long run."""
  run(1), run(1 + steps)  # compile / warm caches
  best, out = float("inf"), None
  for _ in range(reps):
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    out = run(1 + steps)
    best = min(best, (time.perf_counter() - t1) - (t1 - t0))
  return batch * steps / best, out


def plain_decode_tokens_per_s(cfg, params, batch: int, prompt_len: int, steps: int):
  """Baseline: jaxllm.model.generate (prefill, then a lax.scan of cached one-token steps)."""
  mdef, prompt = model_def(cfg), jnp.asarray(decode_prompts(cfg.vocab_size, batch, prompt_len))
  return _decode_rate(lambda n: np.asarray(plain_generate(mdef, params, prompt, n)), batch, steps)


def engine_decode_phase(engine: Engine, prompts, max_tokens: int, reps: int = 2) -> dict:
  """The engine generating max_tokens for every prompt together, timed from the step that gives the
  last request its first token (prefill done) until all finish: its decode phase. Chunked prefill
  staggers the requests (early ones have decoded a few tokens in the mixed steps), so the last chunk
  runs part-empty; plain/HF decode one synchronized batch. The best (tokens/s) of `reps` runs after
  a warm-up run: {"tok_s", "wall", "waited" (host blocked on device results), "chained" (launches
  overlapped, serve.overlap), "outputs" [batch, max_tokens]}."""
  best = None
  for rep in range(1 + reps):  # the first run warms up
    engine.set_weights(engine.params, engine.weight_version + 1)  # fresh radix namespace: no reuse
    reqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
    while not all(r.output for r in reqs):
      engine.step()
    n0, w0, c0, t0 = sum(len(r.output) for r in reqs), engine.wait_seconds, engine.chained, time.perf_counter()
    engine.run()
    wall = time.perf_counter() - t0
    got = {
      "tok_s": (sum(len(r.output) for r in reqs) - n0) / wall,
      "wall": wall,
      "waited": engine.wait_seconds - w0,
      "chained": engine.chained - c0,
      "outputs": np.array([r.output for r in reqs]),
    }
    if rep and (best is None or got["tok_s"] > best["tok_s"]):
      best = got
  return best


def engine_decode_tokens_per_s(engine: Engine, batch: int, prompt_len: int, steps: int, reps: int = 2):
  """(decode tokens/s, tokens [batch, 1 + steps]) of the engine on `batch` fresh random prompts."""
  prompts = [list(map(int, p)) for p in decode_prompts(engine.cfg.vocab_size, batch, prompt_len)]
  m = engine_decode_phase(engine, prompts, 1 + steps, reps)
  return m["tok_s"], m["outputs"]


def hf_causal_lm(cfg, params):
  """transformers AutoModelForCausalLM (fp32, eval mode) on the same weights, written by
  jaxllm.io.export_hf; None if transformers/torch are not installed."""
  try:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxllm.io import export_hf
  except ImportError:
    return None
  with tempfile.TemporaryDirectory() as d:
    export_hf(jax.device_get(params), cfg, d)
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def over_torch_threads(measure) -> list:
  """[(threads, measure())] at torch's default thread count and at 1 thread: on a loaded machine
  torch's OpenMP threads can stall each other many times over (docs/benchmarks.md), so a fair
  baseline keeps the faster."""
  import torch

  default, out = torch.get_num_threads(), []
  try:
    for threads in sorted({default, 1}, reverse=True):
      torch.set_num_threads(threads)
      out.append((threads, measure()))
  finally:
    torch.set_num_threads(default)
  return out


def hf_decode_tokens_per_s(cfg, params, batch: int, prompt_len: int, steps: int):
  """transformers generate (greedy, fp32) on the same weights, at the faster of torch's default thread
  count and 1 thread -> (tokens/s, tokens, threads), or Nones if transformers/torch are not installed."""
  model = hf_causal_lm(cfg, params)
  if model is None:
    return None, None, None
  import torch

  ids = torch.from_numpy(decode_prompts(cfg.vocab_size, batch, prompt_len).astype(np.int64))
  mask = torch.ones_like(ids)

  def run(n):
    with torch.no_grad():
      out = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
      )
    return out[:, prompt_len:].numpy()

  threads, (rate, toks) = max(over_torch_threads(lambda: _decode_rate(run, batch, steps)), key=lambda r: r[1][0])
  return rate, toks, threads


def decode_comparison(cfg, params, engine: Engine, batch: int, prompt_len: int, steps: int, log=print) -> dict:
  """Decode tokens/s of engine, plain jitted loop and HF generate on the same prompts and weights;
  also how many greedy tokens the three agree on (fp32 reductions differ in order, so a near-tie
  may flip an argmax and the rest of that row follows it)."""
  ours, t_ours = engine_decode_tokens_per_s(engine, batch, prompt_len, steps)
  plain, t_plain = plain_decode_tokens_per_s(cfg, params, batch, prompt_len, steps)
  hf, t_hf, threads = hf_decode_tokens_per_s(cfg, params, batch, prompt_len, steps)
  same = lambda a, b: 100.0 * float(np.mean(a == b))
  line = (
    f"decode throughput at batch {batch}, context {prompt_len}+{steps} (decode_steps={engine.decode_steps}): "
    f"engine {ours:.0f} tok/s, plain jitted generate {plain:.0f} tok/s (x{ours / plain:.2f}), "
  )
  line += (
    "HF transformers generate: skipped (pip install torch transformers)"
    if hf is None
    else f"HF transformers generate {hf:.0f} tok/s at {threads} torch thread(s) (x{ours / hf:.2f})"
  )
  log(line)
  log(
    f"greedy tokens equal to the plain loop's: engine {same(t_ours, t_plain):.1f}%"
    + ("" if hf is None else f", HF {same(t_hf, t_plain):.1f}%")
  )
  return {"engine": ours, "plain": plain, "hf": hf}


COLUMNS = [
  ("setting", 22, "<22"),
  ("hit%", 6, ">6.1f"),
  ("ideal%", 6, ">6.1f"),
  ("prefill", 7, ">7d"),
  ("tok/s", 7, ">7.0f"),
  ("ttft50ms", 8, ">8.0f"),
  ("ttft90ms", 8, ">8.0f"),
  ("ttft99ms", 8, ">8.0f"),
  ("tpot50ms", 8, ">8.1f"),
  ("tpot90ms", 8, ">8.1f"),
  ("tpot99ms", 8, ">8.1f"),
  ("radix%", 6, ">6.2f"),
  ("preempt", 7, ">7d"),
]


def format_row(name: str, m: dict, ideal: float) -> str:
  vals = [
    name,
    100 * m["hit"],
    100 * ideal,
    m["prefill"],
    m["tok_s"],
    m["ttft_p50"],
    m["ttft_p90"],
    m["ttft_p99"],
    m["tpot_p50"],
    m["tpot_p90"],
    m["tpot_p99"],
    100 * m["radix"],
    m["preempt"],
  ]
  return " ".join(format(v, spec) for (_, _, spec), v in zip(COLUMNS, vals))


def header() -> str:
  return " ".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w, _) in enumerate(COLUMNS))


def run_bench(
  cfg,
  params,
  w: Workload,
  serve: ServeConfig = ServeConfig(),
  *,
  mem_pages: int | None = None,
  decode_batch=16,
  mesh=None,
  plan=None,
  log=print,
):
  """Every setting on one workload in one process; returns {setting: metrics}. `serve` gives the
  engine settings (page size, max running, chunk size, decode steps, attention); the pool size and
  the buckets are sized here for the workload."""
  page_size, max_running = serve.page_size, serve.max_running
  prompts, offsets = make_workload(w, cfg.vocab_size)
  ideal = ideal_hit_rate(prompts)
  per_req = -(-(w.system_len + w.question_len + w.output_len) // page_size)
  num_pages = max_running * per_req + w.groups * (w.system_len // page_size) + 8  # every prefix fits
  sys_pages = w.system_len // page_size
  # Room for the running requests' own pages and half the system prompts: forces eviction.
  mem_pages = mem_pages or max_running * (per_req - sys_pages) + max(1, w.groups // 2) * sys_pages
  common = dict(
    serve=dataclasses.replace(serve, num_pages=num_pages, max_pages=0, min_seqs=max_running), mesh=mesh, plan=plan
  )
  settings = [("cache off", dict(radix=False))]
  settings += [(f"cache on  {p}", dict(policy=p)) for p in ("fcfs", "lpm", "dfs-weight")]
  settings += [(f"mem {mem_pages}p {p}", dict(policy=p, max_pages=mem_pages)) for p in ("fcfs", "lpm", "dfs-weight")]
  warm = Engine(cfg, params, **common)
  n_compiled = warm.warmup()  # every bucket before any timing (shared by all engines below)
  log(
    f"workload: {w}; {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens; "
    f"pool {num_pages} pages of {page_size}, memory-limited runs {mem_pages}"
    + (f"; mesh dp={plan.cfg.dp} tp={plan.cfg.tp} ep={plan.cfg.ep}" if mesh is not None else "")
  )
  log(header())
  results = {}
  for name, kw in settings:
    eng = Engine(cfg, params, **{**common, **kw})
    results[name] = m = run_workload(eng, prompts, offsets, w.output_len)
    log(format_row(name, m, ideal))
  assert warm.compiles == n_compiled, f"benchmark recompiled: {warm.compiles} compilations after warm-up's {n_compiled}"
  base = results["cache off"]
  for p in ("lpm", "fcfs"):  # lpm is the engine's default (as in SGLang); fcfs isolates the cache alone
    on = results[f"cache on  {p}"]
    log(
      f"cache on ({p}) vs off: throughput x{on['tok_s'] / base['tok_s']:.2f}, "
      f"median TTFT x{base['ttft_p50'] / on['ttft_p50']:.2f} lower, hit rate {100 * on['hit'] / ideal:.1f}% of ideal"
    )
  exact = dict(common, serve=dataclasses.replace(common["serve"], min_seqs=1))  # R = the batch, no padding rows
  results["decode"] = decode_comparison(cfg, params, Engine(cfg, params, **exact), decode_batch, w.system_len, 32, log)
  return results
