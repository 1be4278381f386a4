"""The README's RL demo over several seeds: held-out accuracy after SFT and after RL, the gain, and the
time, per seed, then the median, min and max of the gain. Each seed runs the README's commands as a user
does (fresh processes, the one-device mesh the README names) with train.seed=SEED for both SFT and RL; the data files
(and so the held-out rows) are the same for every seed.

  python benchmarks/bench_rl_demo.py --seeds 0,1,2              # about 5 minutes a seed on 2 CPU cores
  python benchmarks/bench_rl_demo.py --seeds 0 --rl-steps 100   # a shorter check
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
  if r.returncode:
    sys.exit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
  return time.perf_counter() - t0


def one_seed(seed: int, work: str, a) -> dict:
  out = os.path.join(work, f"seed{seed}")
  sft_s = run(
    [
      os.path.join(ROOT, "train.py"),
      "--no-progress",
      "--mesh",
      a.mesh,
      "train.data=data/sft.txt",
      f"train.steps={a.sft_steps}",
      f"train.decay_steps={a.sft_decay}",
      f"train.out_dir={out}/sft",
      "train.sample_tokens=0",
      f"train.seed={seed}",
    ],
    work,
  )
  rl_s = run(
    [
      os.path.join(ROOT, "train.py"),
      "rl",
      "--no-progress",
      "--mesh",
      a.mesh,
      f"rl.init_from={out}/sft/checkpoints",
      "rl.data=data/train.jsonl",
      "rl.eval_data=data/eval.jsonl",
      "rl.stop=\\n",
      f"train.steps={a.rl_steps}",
      "rl.group_size=16",
      "rl.rewards=exact_match:1.0,digits:1.0",
      "serve.page_size=4",
      f"rl.eval_every={a.eval_every}",
      f"train.out_dir={out}/rl",
      f"train.seed={seed}",
    ],
    work,
  )
  lines = [json.loads(line) for line in open(os.path.join(out, "rl", "metrics.jsonl"))]
  evals = [(line["step"], line["heldout_acc"]) for line in lines if "heldout_acc" in line]
  return {
    "seed": seed,
    "sft": evals[0][1],
    "end": evals[-1][1],
    "best": max(a for _, a in evals),
    "sft_s": sft_s,
    "rl_s": rl_s,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--mesh", default=os.path.join(ROOT, "meshes", "cpu-1.toml"), help="mesh preset of both runs")
  p.add_argument("--sft-steps", type=int, default=800)
  p.add_argument("--sft-decay", type=int, default=1000, help="train.decay_steps of the SFT run")
  p.add_argument("--rl-steps", type=int, default=300)
  p.add_argument("--eval-every", type=int, default=25)
  p.add_argument("--work", help="working directory (default: a temporary one)")
  a = p.parse_args()
  work = a.work or tempfile.mkdtemp(prefix="jaxllm-rl-demo-")
  os.makedirs(work, exist_ok=True)
  run(["-m", "jaxllm.data.tasks", "addition", "data"], work)
  rows = []
  for seed in (int(s) for s in a.seeds.split(",")):
    rows.append(one_seed(seed, work, a))
    r = rows[-1]
    print(
      f"seed {r['seed']}: SFT {100 * r['sft']:.1f}% -> RL {100 * r['end']:.1f}% (best {100 * r['best']:.1f}%), "
      f"gain {100 * (r['end'] - r['sft']):+.1f}; SFT {r['sft_s']:.0f} s, RL {r['rl_s']:.0f} s",
      flush=True,
    )
  print(f"\n{'seed':>4} {'SFT':>7} {'RL end':>7} {'best':>7} {'gain':>7} {'SFT s':>7} {'RL s':>7}")
  for r in rows:
    print(
      f"{r['seed']:>4} {100 * r['sft']:>6.1f}% {100 * r['end']:>6.1f}% {100 * r['best']:>6.1f}% "
      f"{100 * (r['end'] - r['sft']):>+6.1f} {r['sft_s']:>7.0f} {r['rl_s']:>7.0f}"
    )
  gains = [100 * (r["end"] - r["sft"]) for r in rows]
  print(
    f"gain over {len(rows)} seeds: median {statistics.median(gains):+.1f}, min {min(gains):+.1f}, "
    f"max {max(gains):+.1f} points ({a.rl_steps} RL steps, {a.sft_steps} SFT steps; work dir {work})"
  )


if __name__ == "__main__":
  main()
