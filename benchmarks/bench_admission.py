"""Admission and the scheduler's host time per step: the scheduler alone, no model (sampled tokens
are random), so the figures are pure host work.

Table 1, chat burst: 32 chat requests without max_tokens (max_tokens = the context - prompt) arrive at
once on ServeConfig's default pool (1,024 pages of 16 tokens); the most that run together over the
first steps, per context (2k, and the pool's 16k when model.max_seq_len is larger) and per
serve.reserve_clip (0 = reserve all of max_tokens, the admission before the clip).
Table 2, worst case: the same burst at a 2k context, every request generating all of its max_tokens
(random weights with ignore_eos do this): scheduler steps to finish all (one token per running
request per step), the mean batch, preemptions, and prompt + generated tokens recomputed after them.
Table 3, ordering cost: 32 running (every slot taken), 128 waiting prompts over 8 shared system
prompts cached in the radix tree; per policy, the milliseconds of ordering the whole waiting queue
(what schedule() paid every step before it skipped ordering when no slot is free) against one whole
schedule() + commit of the step now.

  python benchmarks/bench_admission.py [--reps 50] [--prompt-len 256]
"""

import argparse
import dataclasses
import time

import numpy as np

from jaxllm.config import ServeConfig
from jaxllm.serve.sampling import SamplingParams
from jaxllm.serve.scheduler import POLICIES, Req, Scheduler


def scheduler(sc: ServeConfig, **kw) -> Scheduler:
  return Scheduler.from_config(dataclasses.replace(sc, **kw))


def chat_burst(sc: ServeConfig, context: int, prompt_len: int = 40, steps: int = 16) -> tuple[int, int]:
  """(most requests running at once, pages in use then) for 32 chat requests without max_tokens."""
  sched, rng = scheduler(sc), np.random.default_rng(0)
  for i in range(32):
    prompt = list(map(int, rng.integers(0, 300, prompt_len)))
    sched.add(Req(i, prompt, SamplingParams(max_tokens=context - prompt_len)))
  most, used = 0, 0
  for _ in range(steps):
    batch = sched.schedule()
    if len(sched.running) > most:
      most, used = len(sched.running), sched.alloc.total - sched.alloc.num_free
    sched.commit(batch, rng.integers(0, 300, len(batch)), np.zeros(len(batch)), 0.0)
  return most, used


def worst_case(sc: ServeConfig, context: int = 2048, prompt_len: int = 40) -> dict:
  """The chat burst with every request running to its max_tokens, to the end."""
  sched, rng = scheduler(sc), np.random.default_rng(0)
  sp = SamplingParams(max_tokens=context - prompt_len)
  reqs = [Req(i, list(map(int, rng.integers(0, 300, prompt_len))), sp) for i in range(32)]
  for r in reqs:
    sched.add(r)
  steps = rows = 0
  while sched.running or sched.waiting:
    batch = sched.schedule()
    steps, rows = steps + 1, rows + len(batch)
    sched.commit(batch, rng.integers(0, 300, len(batch)), np.zeros(len(batch)), 0.0)
  st = sched.stats
  assert all(len(r.output) == r.sp.max_tokens for r in reqs)
  return {
    "steps": steps,
    "batch": rows / steps,
    "preemptions": st.preemptions,
    "most_per_request": max(r.preemptions for r in reqs),
    "recomputed": st.computed_tokens - st.prompt_tokens + st.cached_tokens,
  }


def full_queue(policy: str, prompt_len: int) -> Scheduler:
  """32 running requests decoding, 128 waiting over 8 cached system prompts."""
  sched = Scheduler(8192, 16, max_running=32, chunk_size=8192, policy=policy)
  rng = np.random.default_rng(0)
  systems = [list(map(int, rng.integers(0, 30000, prompt_len - 16))) for _ in range(8)]
  prompt = lambda i: systems[i % 8] + list(map(int, rng.integers(0, 30000, 16)))
  for i in range(32):
    sched.add(Req(i, prompt(i), SamplingParams(max_tokens=10_000)))
  while len(sched.running) < 32 or any(r.prefilling for r in sched.running):
    batch = sched.schedule()
    sched.commit(batch, rng.integers(0, 30000, len(batch)), np.zeros(len(batch)), 0.0)
  for i in range(32, 160):
    sched.add(Req(i, prompt(i), SamplingParams(max_tokens=16)))
  return sched


def ms_per_call(fn, reps: int) -> float:
  fn()
  t0 = time.perf_counter()
  for _ in range(reps):
    fn()
  return (time.perf_counter() - t0) / reps * 1e3


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--reps", type=int, default=50)
  ap.add_argument("--prompt-len", type=int, default=256, help="tokens per waiting prompt (table 2)")
  args = ap.parse_args()

  sc = ServeConfig()
  pool = sc.num_pages * sc.page_size
  print(f"32 chat requests without max_tokens, pool {sc.num_pages} pages x {sc.page_size} tokens")
  print(f"{'context':>8} {'reserve_clip':>13} {'most running':>13} {'pages used':>11}")
  for context in (2048, pool):
    for clip in (0, sc.reserve_clip):
      most, used = chat_burst(dataclasses.replace(sc, reserve_clip=clip), context)
      print(f"{context:>8} {clip:>13} {most:>13} {used:>11}")

  print("\nworst case: the 2k-context burst, every request generating all of its max_tokens")
  print(
    f"{'reserve_clip':>13} {'steps':>7} {'mean batch':>11} {'preemptions':>12} {'max/request':>12} {'recomputed':>11}"
  )
  for clip in (0, sc.reserve_clip):
    m = worst_case(dataclasses.replace(sc, reserve_clip=clip))
    print(
      f"{clip:>13} {m['steps']:>7} {m['batch']:>11.1f} {m['preemptions']:>12} {m['most_per_request']:>12}"
      f" {m['recomputed']:>11}"
    )

  print(f"\n32 running, 128 waiting ({args.prompt_len}-token prompts): host ms per step")
  print(f"{'policy':>11} {'order queue (before)':>21} {'schedule+commit (now)':>22}")
  for policy in POLICIES:
    sched = full_queue(policy, args.prompt_len)
    order = ms_per_call(sched._ordered_waiting, args.reps)
    rng = np.random.default_rng(1)

    def step():
      batch = sched.schedule()
      sched.commit(batch, rng.integers(0, 30000, len(batch)), np.zeros(len(batch)), 0.0)

    now = ms_per_call(step, args.reps)
    assert len(sched.running) == 32 and len(sched.waiting) == 128
    print(f"{policy:>11} {order:>21.3f} {now:>22.3f}")


if __name__ == "__main__":
  main()
