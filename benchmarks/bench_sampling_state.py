"""What per-request sampling state costs a decode step: plain greedy rows against rows with
penalties, a 300-entry logit_bias and stop ids, one step per call and 8, overlap off and on.

Per setting: the median time between a row's tokens over the decode (a multi-step call's tokens share
one time, so it is the call's time / 8 there), the process's CPU time per decode step (prefill
included; steadier than wall time on a shared machine), each the best of --reps warm runs, and the
compiles the requests caused after Engine.warmup() (0 when request fields select no shape of their
own). The script uses only
the engine's public API, so running it at two commits compares them.

  python benchmarks/bench_sampling_state.py
  python benchmarks/bench_sampling_state.py --batch 8 --new 64
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

from jaxllm.config import MODEL_PRESETS, ServeConfig  # noqa: E402
from jaxllm.model.params import init_params  # noqa: E402
from jaxllm.serve import Engine  # noqa: E402
from jaxllm.serve.sampling import SamplingParams  # noqa: E402


def rows(kind: str, batch: int, new: int, vocab: int) -> list[SamplingParams]:
  rng = random.Random(0)
  if kind == "plain":
    return [SamplingParams(max_tokens=new) for _ in range(batch)]
  return [
    SamplingParams(
      max_tokens=new,
      presence_penalty=0.5,
      frequency_penalty=0.3,
      repetition_penalty=1.1,
      logit_bias={t: rng.uniform(-1, 1) for t in rng.sample(range(vocab), 300)},
      stop_token_ids=tuple(rng.sample(range(vocab), 4 + i % 8)),
      min_tokens=new,  # the stop ids stay banned: every row runs to max_tokens
    )
    for i in range(batch)
  ]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="tiny")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--new", type=int, default=48)
  ap.add_argument("--reps", type=int, default=5)
  a = ap.parse_args()
  cfg = dataclasses.replace(MODEL_PRESETS[a.model], max_seq_len=256)
  params = init_params(cfg, 0)
  rng = random.Random(1)
  prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(8, 40))] for _ in range(a.batch)]
  print(f"model {a.model}, batch {a.batch}, {a.new} new tokens; ms per token step (median), compiles after warm-up")
  print(f"{'steps':>5} {'overlap':>7} {'plain':>8} {'state':>8} {'cpu plain':>9} {'state':>8} {'compiles':>8}")
  for steps in (1, 8):
    for overlap in (False, True):
      serve = ServeConfig(max_running=a.batch, min_seqs=a.batch, chunk_size=256, decode_steps=steps, overlap=overlap)
      eng = Engine(cfg, params, serve)
      eng.warmup()
      wall, cpu, warm = {}, {}, eng.compiles
      for kind in ("plain", "state"):
        sps = rows(kind, a.batch, a.new, cfg.vocab_size)
        eng.generate(prompts, sps)  # any shape these fields select compiles here
        wall[kind], cpu[kind] = [], []
        for _ in range(a.reps):
          t0 = time.process_time()
          wall[kind].append(per_step(eng.generate(prompts, sps), steps))
          cpu[kind].append((time.process_time() - t0) / a.new)
      compiles = eng.compiles - warm
      ms = lambda xs: f"{1e3 * min(xs):>6.3f}ms"
      print(
        f"{steps:>5} {str(overlap):>7} {ms(wall['plain'])} {ms(wall['state'])} {ms(cpu['plain'])} "
        f"{ms(cpu['state'])} {compiles:>8}"
      )


def per_step(results, steps: int) -> float:
  """Median seconds per token step: the gap between consecutive distinct token times / tokens per call."""
  gaps = []
  for r in results:
    times = sorted(set(r.token_times[1:]))  # from the first decode call on
    gaps += [b - a for a, b in zip(times, times[1:])]
  gaps.sort()
  return gaps[len(gaps) // 2] / steps


if __name__ == "__main__":
  main()
