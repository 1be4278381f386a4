#!/usr/bin/env python
"""Train a jaxllm model. With no arguments: the `tiny` model on the embedded corpus (Python's own
standard library source) on the emulated 8-device CPU mesh, for a few minutes.

  python train.py [--mesh meshes/NAME.toml] [--config FILE.toml] [--init-from-hf DIR] [key=value ...]
  e.g. python train.py model=tiny-moe mesh.ep=4 train.steps=200 train.out_dir=runs/moe
  python train.py --coordinator HOST0:PORT --num-processes N --process-id I [...]   one process per host
  python train.py rl rl.init_from=runs/sft/checkpoints [rl.key=value ...]   off-policy RL (see rl --help)
  python train.py reward --data pairs.jsonl [reward.key=value ...]   reward model (see reward --help)
"""

import argparse
import sys

from jaxllm import cli

# RL fine-tunes a trained policy: a small constant learning rate, no warmup, no weight decay (the
# pretraining defaults of train.* would wreck it). Listed in --help; any of them can be overridden.
RL_DEFAULTS = [
  "train.out_dir=runs/rl",
  "train.lr=5e-5",
  "train.warmup_steps=0",
  "train.min_lr_ratio=1.0",
  "train.weight_decay=0.0",
]


def parser(prog: str, doc: str, sections: tuple[str, ...], epilog_head: str = "") -> argparse.ArgumentParser:
  """The options every `train.py` command shares: key=value overrides, --mesh, --config, --no-progress
  and the multi-host flags; the help lists the config keys of `sections`."""
  p = argparse.ArgumentParser(
    prog=prog,
    description=doc,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=epilog_head + "config keys (section.key=value):\n" + cli.config_help(sections),
  )
  p.add_argument("overrides", nargs="*", help=f"{'.key=value / '.join(sections)}.key=value overrides")
  p.add_argument("--mesh", help="mesh preset TOML (meshes/*.toml); default: cpu-8 on CPU, all devices as dp otherwise")
  p.add_argument(
    "--config", action="append", default=[], help=f"TOML file(s) with {'/'.join(f'[{s}]' for s in sections)} tables"
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
  cli.add_distributed_args(p)
  return p


def parse(p: argparse.ArgumentParser, argv):
  """Parse (options and key=value overrides mix in any order), then set up devices and multi-host
  before jax starts."""
  args = p.parse_intermixed_args(argv)
  cli.prepare_devices(args.mesh, args.overrides)
  cli.init_distributed(args, args.overrides)
  return args


def rl_main(argv) -> int:
  """`train.py rl`: off-policy RL from an SFT checkpoint (rl.init_from) on a verifiable task."""
  p = parser(
    "train.py rl",
    rl_main.__doc__,
    ("rl", "train", "serve"),
    "defaults for RL (before yours): " + " ".join(RL_DEFAULTS) + "\n\n",
  )
  args = parse(p, argv)
  from jaxllm.config import load_config
  from jaxllm.rl.loop import rl_train

  try:
    cfg = load_config(args.config, RL_DEFAULTS + cli.mesh_overrides(args.mesh) + args.overrides)
    summary = rl_train(cfg, progress=not args.no_progress)
  except cli.user_errors() as e:
    cli.fail(str(e))
  if cli.is_main():
    print(
      f"\nRL to step {summary['steps']}: held-out accuracy {100 * summary['first_acc']:.1f}% -> "
      f"{100 * summary['last_acc']:.1f}%"
    )
    print(f"checkpoint: {summary['checkpoint_dir']}")
    print(f"plot: {summary['plot']}   (reward and held-out accuracy against step; metrics.jsonl beside it)")
  return 0


def reward_main(argv) -> int:
  """`train.py reward`: a reward model (the shared backbone + a scalar head, Bradley-Terry loss) on
  preference pairs, jsonl lines {"prompt", "chosen", "rejected"}; prints held-out pair accuracy and
  writes train.out_dir/checkpoints, which `rl.rewards=rm:DIR:WEIGHT` scores with."""
  p = parser("train.py reward", " ".join(reward_main.__doc__.split()), ("reward", "model", "train"))
  p.add_argument("--data", help="preference pairs, jsonl (same as reward.data=FILE)")
  args = parse(p, argv)
  from jaxllm.config import load_config
  from jaxllm.rl.reward_model import train_reward_model

  try:
    data = [f"reward.data={args.data}"] if args.data else []
    cfg = load_config(args.config, ["train.out_dir=runs/rm"] + cli.mesh_overrides(args.mesh) + args.overrides + data)
    summary = train_reward_model(cfg, progress=not args.no_progress)
  except cli.user_errors() as e:
    cli.fail(str(e))
  if cli.is_main():
    print(
      f"\nreward model to step {summary['steps']}: held-out pair accuracy {100 * summary['first_acc']:.1f}% -> "
      f"{100 * summary['last_acc']:.1f}% ({summary['heldout_pairs']} pairs: r(chosen) > r(rejected))"
    )
    print(f"checkpoint: {summary['checkpoint_dir']}   (use it as rl.rewards=rm:{summary['checkpoint_dir']}:WEIGHT)")
  return 0


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "rl":
    return rl_main(argv[1:])
  if argv and argv[0] == "reward":
    return reward_main(argv[1:])
  p = parser("train.py", __doc__, ("model", "mesh", "train"))
  p.add_argument("--init-from-hf", help="start from a Hugging Face model directory (config.json + safetensors)")
  args = parse(p, argv)
  from jaxllm.config import load_config
  from jaxllm.serve import complete_text
  from jaxllm.train.loop import train

  try:
    overrides = cli.mesh_overrides(args.mesh)
    base = None
    if args.init_from_hf:
      from jaxllm.config import Config
      from jaxllm.io import hf_tokenizer_path, load_hf_config

      base = Config(model=load_hf_config(args.init_from_hf))
      overrides.append(f"train.init_from_hf={args.init_from_hf}")
      if hf_tokenizer_path(args.init_from_hf):
        overrides.append(f"train.tokenizer={hf_tokenizer_path(args.init_from_hf)}")
    cfg = load_config(args.config, overrides + args.overrides, base=base)
    summary = train(cfg, progress=not args.no_progress, sampler=complete_text)
  except cli.user_errors() as e:
    cli.fail(str(e))
  if not cli.is_main():
    return 0  # process 0 prints the run's summary
  if summary["first_loss"] is None:
    print(
      f"\nnothing to do: the checkpoint in {summary['checkpoint_dir']} is already at train.steps="
      f"{summary['steps']} (raise train.steps to continue: the learning rate keeps its schedule and stays "
      "at its floor past train.decay_steps; or set train.out_dir for a new run)"
    )
  else:
    print(
      f"\ntrained to step {summary['steps']}: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"
      + (f", eval loss {summary['eval_loss']:.3f}" if summary["eval_loss"] is not None else "")
      + f"; step compile {summary['compile_s']:.1f}s"
    )
  print(f"checkpoint: {summary['checkpoint_dir']}")
  if summary["sample"]:
    print("sample:\n" + "-" * 60 + "\n" + summary["sample"] + "\n" + "-" * 60)
  return 0


if __name__ == "__main__":
  cli.tune_malloc()
  sys.exit(main())
