"""The RL demo of the README and docs/rl.md at reduced length (marked slow; run with
`python -m pytest -m slow tests/rl/test_rl_demo.py`): SFT on 1-2 digit addition through `train.py`, then
`train.py rl` from it, both as a user runs them (fresh processes, the one-device mesh the README names);
held-out accuracy after 100 RL steps is clearly above the SFT model's (2026-12-07, 2-core AMD EPYC:
+14.0 to +18.6 points at step 100 over seeds 0, 1, 2; the full demo's numbers and run times are in
docs/rl.md)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESH = os.path.join(ROOT, "meshes", "cpu-1.toml")


def cli(*args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run(
    [sys.executable, os.path.join(ROOT, "train.py"), *args, "--no-progress", "--mesh", MESH],
    cwd=cwd,
    capture_output=True,
    text=True,
    env=env,
    timeout=1800,
  )
  assert r.returncode == 0, r.stderr[-4000:]
  return r.stdout


@pytest.mark.slow
def test_sft_then_rl_raises_heldout_accuracy(tmp_path):
  r = subprocess.run([sys.executable, "-m", "jaxllm.data.tasks", "addition", "data"], cwd=tmp_path, timeout=300)
  assert r.returncode == 0
  cli(
    "train.data=data/sft.txt",
    "train.steps=800",
    "train.decay_steps=1000",
    "train.out_dir=runs/sft",
    "train.sample_tokens=0",
    cwd=tmp_path,
  )
  cli(
    "rl",
    "rl.init_from=runs/sft/checkpoints",
    "rl.data=data/train.jsonl",
    "rl.eval_data=data/eval.jsonl",
    "rl.stop=\\n",
    "train.steps=100",
    "rl.group_size=16",
    "rl.rewards=exact_match:1.0,digits:1.0",
    "serve.page_size=4",
    "rl.eval_every=50",
    "train.out_dir=runs/rl",
    cwd=tmp_path,
  )
  lines = [json.loads(l) for l in open(tmp_path / "runs" / "rl" / "metrics.jsonl")]
  evals = [(l["step"], l["heldout_acc"]) for l in lines if "heldout_acc" in l]
  assert evals[0][0] == 0 and 0.2 <= evals[0][1] <= 0.6, evals  # SFT lands in the band GRPO can move
  assert evals[-1][1] >= evals[0][1] + 0.10, evals
  assert (tmp_path / "runs" / "rl" / "rl.png").stat().st_size > 1000
