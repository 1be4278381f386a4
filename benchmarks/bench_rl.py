"""Off-policy RL, staleness bound eta = 0, 1, 2 side by side in one process.

From one starting checkpoint (an SFT run of the addition task, see docs/rl.md), each
setting runs `train.py rl`'s loop (jaxllm.rl.loop.rl_train) with the same config but rl.eta, and the
table shows per eta: learner steps and wall-clock (RL only, held-out evaluations excluded) until the
held-out accuracy first reaches the target, the accuracy at the end, generation and training
tokens/s, the time one step takes, and the rollout prefix-cache hit rate against the ideal (G-1)/G
of prompt tokens (every sample of a group but the first reuses the prompt; the engine recomputes each
follower's last partial page, so with short prompts the reachable share is lower: that bound is shown
too). A warm-up run first fills the persistent compilation cache so no setting pays for compiles the
others reuse.

  python benchmarks/bench_rl.py --init-from runs/sft/checkpoints                 # defaults below
  python benchmarks/bench_rl.py --init-from runs/sft/checkpoints --steps 100 --target 0.6 \\
      rl.group_size=8 rl.prompts_per_step=16 serve.page_size=1

Extra arguments are section.key=value overrides of the RL config (as for `train.py rl`).
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxllm import cli  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--init-from", required=True, help="checkpoints dir of the SFT policy (rl.init_from)")
  p.add_argument("--etas", default="0,1,2")
  p.add_argument("--steps", type=int, default=150, help="learner steps per setting")
  p.add_argument("--target", type=float, default=None, help="held-out accuracy to reach (default: start + 0.10)")
  p.add_argument("--eval-every", type=int, default=10)
  p.add_argument("--mesh", default=None, help="mesh preset TOML (default: as train.py rl)")
  p.add_argument("overrides", nargs="*")
  args = p.parse_args()
  cli.prepare_devices(args.mesh, args.overrides)
  import jax

  jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jaxllm_bench_rl_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from jaxllm.config import load_config
  from jaxllm.rl.loop import rl_train

  base = [
    "train.lr=5e-5",
    "train.warmup_steps=0",
    "train.min_lr_ratio=1.0",
    "train.weight_decay=0",
    "train.save_every=0",
    f"rl.eval_every={args.eval_every}",
    *cli.mesh_overrides(args.mesh),
    f"rl.init_from={args.init_from}",
    *args.overrides,
  ]
  out = tempfile.mkdtemp(prefix="bench_rl_")
  quiet = lambda *_: None
  cfg = load_config([], base + ["train.steps=2", "rl.eta=0", f"train.out_dir={out}/warmup"])
  print("warm-up (compiles) ...", flush=True)
  rl_train(cfg, progress=False, log=quiet)
  rows = []
  for eta in [int(e) for e in args.etas.split(",")]:
    cfg = load_config([], base + [f"train.steps={args.steps}", f"rl.eta={eta}", f"train.out_dir={out}/eta{eta}"])
    t0 = time.perf_counter()
    s = rl_train(cfg, progress=True, log=quiet)
    wall = time.perf_counter() - t0
    h = s["history"]
    target = args.target if args.target is not None else s["first_acc"] + 0.10
    hit = next((r for r in h if r.get("heldout_acc", -1) >= target), None)
    G = cfg.rl.group_size
    mean = lambda k: sum(r[k] for r in h[1:]) / max(1, len(h) - 1)  # the first step includes warm-up effects
    rows.append(
      {
        "eta": eta,
        "target": target,
        "first": s["first_acc"],
        "last": s["last_acc"],
        "steps_to": hit["step"] if hit else None,
        "time_to": hit["elapsed_s"] if hit else None,
        "step_s": h[-1]["elapsed_s"] / len(h),
        "gen": mean("gen_tok_s"),
        "train": mean("train_tok_s"),
        "hit": mean("cache_hit"),
        "ideal": (G - 1) / G,
        "wall": wall,
      }
    )
  print(
    f"\nRL from {args.init_from}: {args.steps} steps per setting, G={cfg.rl.group_size}, "
    f"{cfg.rl.prompts_per_step} prompts/step, page_size={cfg.serve.page_size}, {jax.devices()[0].platform}"
  )
  head = (
    f"{'eta':>3} {'start':>6} {'target':>6} {'steps to':>8} {'s to':>7} {'end':>6} {'s/step':>7} "
    f"{'gen tok/s':>9} {'train tok/s':>11} {'cache hit':>9} {'ideal':>6} {'hit/ideal':>9}"
  )
  print(head + "\n" + "-" * len(head))
  for r in rows:
    to = lambda v, f: "never" if v is None else format(v, f)
    print(
      f"{r['eta']:>3} {r['first']:>6.1%} {r['target']:>6.1%} {to(r['steps_to'], '>8d'):>8} "
      f"{to(r['time_to'], '>7.1f'):>7} {r['last']:>6.1%} {r['step_s']:>7.2f} {r['gen']:>9.0f} {r['train']:>11.0f} "
      f"{r['hit']:>9.1%} {r['ideal']:>6.1%} {r['hit'] / r['ideal']:>9.1%}"
    )
  base_row = next((r for r in rows if r["eta"] == 0 and r["time_to"]), None)
  if base_row:
    for r in rows:
      if r["eta"] and r["time_to"]:
        print(f"eta={r['eta']}: {base_row['time_to'] / r['time_to']:.2f}x sooner to the target than eta=0")


if __name__ == "__main__":
  main()
