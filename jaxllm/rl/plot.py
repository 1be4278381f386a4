"""The RL run's plot: reward and held-out accuracy against learner step, from its metrics.jsonl.

Written by `train.py rl` at the end of every run (out_dir/rl.png); also `python -m jaxllm.rl.plot
METRICS.jsonl OUT.png` for a run in progress. Reward is shown per step and as a moving average (one
step's reward is the mean over prompts_per_step * group_size samples, so it is noisy); held-out
accuracy is greedy exact match on the task's held-out split at the steps it was measured.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_rl(metrics_path: str, out_path: str, title: str | None = None, window: int = 10) -> str:
  """Write the PNG; -> out_path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(metrics_path)
  stepped = [r for r in rows if "reward" in r]
  steps = np.array([r["step"] for r in stepped])
  evals = [(r["step"], r["heldout_acc"]) for r in rows if "heldout_acc" in r]
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  top = 1.0
  # The total reward, and the exact-match term alone when other terms are mixed in.
  series = [("reward", "reward (total)", "tab:blue")]
  if stepped and "reward/exact_match" in stepped[0] and len([k for k in stepped[0] if k.startswith("reward/")]) > 1:
    series.append(("reward/exact_match", "exact match of the samples", "tab:green"))
  for key, label, color in series if len(steps) else []:
    y = np.array([r[key] for r in stepped])
    w = max(1, min(window, len(y)))
    ax.plot(steps, y, color=color, alpha=0.2, lw=1)
    ax.plot(
      steps[w - 1 :], np.convolve(y, np.ones(w) / w, mode="valid"), color=color, lw=2, label=f"{label} ({w}-step mean)"
    )
    top = max(top, float(y.max()))
  if evals:
    es, ea = zip(*evals)
    ax.plot(es, ea, "o-", color="tab:red", lw=2, label="held-out accuracy (greedy)")
  ax.set_xlabel("learner step")
  ax.set_ylabel("reward / accuracy")
  ax.set_ylim(0, top * 1.02)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)
  ax.set_title(title or "jaxllm RL")
  fig.tight_layout()
  fig.savefig(out_path)
  plt.close(fig)
  return out_path


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: python -m jaxllm.rl.plot METRICS.jsonl OUT.png")
  print(plot_rl(sys.argv[1], sys.argv[2]))
