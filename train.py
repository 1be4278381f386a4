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
RL_DEFAULTS = ["train.out_dir=runs/rl", "train.lr=5e-5", "train.warmup_steps=0", "train.min_lr_ratio=1.0",
               "train.weight_decay=0.0"]


def rl_main(argv) -> int:
  """`train.py rl`: off-policy RL from an SFT checkpoint (rl.init_from) on a verifiable task."""
  p = argparse.ArgumentParser(prog="train.py rl", description=rl_main.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="defaults for RL (before yours): " + " ".join(RL_DEFAULTS) +
                              "\n\nconfig keys (section.key=value):\n" + cli.config_help(("rl", "train", "serve")))
  p.add_argument("overrides", nargs="*", help="rl.key=value / train.key=value / serve.key=value overrides")
  p.add_argument("--mesh", help="mesh preset TOML; default: cpu-8 on CPU, all devices as dp otherwise")
  p.add_argument("--config", action="append", default=[], help="TOML file(s) with [rl]/[train]/[serve] tables")
  p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
  args = p.parse_intermixed_args(argv)
  cli.prepare_devices(args.mesh)
  from jaxllm.config import ConfigError, load_config
  from jaxllm.rl.loop import rl_train
  from jaxllm.train.checkpoint import CheckpointError
  try:
    overrides = cli.mesh_overrides(args.mesh)
    cfg = load_config(args.config, RL_DEFAULTS + overrides + args.overrides)
    summary = rl_train(cfg, progress=not args.no_progress)
  except (ConfigError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
    cli.fail(str(e))
  print(f"\nRL to step {summary['steps']}: held-out accuracy {100 * summary['first_acc']:.1f}% -> "
        f"{100 * summary['last_acc']:.1f}%")
  print(f"checkpoint: {summary['checkpoint_dir']}")
  print(f"plot: {summary['plot']}   (reward and held-out accuracy against step; metrics.jsonl beside it)")
  return 0


def reward_main(argv) -> int:
  """`train.py reward`: a reward model (the shared backbone + a scalar head, Bradley-Terry loss) on
  preference pairs, jsonl lines {"prompt", "chosen", "rejected"}; prints held-out pair accuracy and
  writes train.out_dir/checkpoints, which `rl.rewards=rm:DIR:WEIGHT` scores with."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--mesh")
  cli.prepare_devices(pre.parse_known_args(argv)[0].mesh)   # before jax: reward_model imports it
  from jaxllm.rl import reward_model as rm
  p = argparse.ArgumentParser(prog="train.py reward", description=" ".join(reward_main.__doc__.split()),
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="config keys (section.key=value):\n" + rm.config_help() + "\n"
                              + cli.config_help(("model", "train")))
  p.add_argument("overrides", nargs="*", help="reward.key=value / train.key=value / model.key=value overrides")
  p.add_argument("--data", help="preference pairs, jsonl (same as reward.data=FILE)")
  p.add_argument("--mesh", help="mesh preset TOML; default: cpu-8 on CPU, all devices as dp otherwise")
  p.add_argument("--config", action="append", default=[], help="TOML file(s) with [model]/[train] tables")
  p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
  args = p.parse_intermixed_args(argv)
  from jaxllm.config import ConfigError, load_config
  from jaxllm.train.checkpoint import CheckpointError
  from jaxllm.train.loop import TrainingDiverged
  try:
    ours, others = rm.split_overrides(args.overrides)
    rcfg = rm.reward_config(ours + ([f"reward.data={args.data}"] if args.data else []))
    overrides = cli.mesh_overrides(args.mesh)
    cfg = load_config(args.config, ["train.out_dir=runs/rm"] + overrides + others)
    summary = rm.train_reward_model(cfg, rcfg, progress=not args.no_progress)
  except (ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  print(f"\nreward model to step {summary['steps']}: held-out pair accuracy {100 * summary['first_acc']:.1f}% -> "
        f"{100 * summary['last_acc']:.1f}% ({summary['heldout_pairs']} pairs: r(chosen) > r(rejected))")
  print(f"checkpoint: {summary['checkpoint_dir']}   (use it as rl.rewards=rm:{summary['checkpoint_dir']}:WEIGHT)")
  return 0


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "rl":
    return rl_main(argv[1:])
  if argv and argv[0] == "reward":
    return reward_main(argv[1:])
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="config keys (section.key=value):\n" + cli.config_help())
  p.add_argument("overrides", nargs="*", help="section.key=value overrides, or model=PRESET")
  p.add_argument("--mesh", help="mesh preset TOML (meshes/*.toml); default: cpu-8 on CPU, all devices as dp otherwise")
  p.add_argument("--config", action="append", default=[], help="TOML file(s) with [model]/[mesh]/[train] tables")
  p.add_argument("--init-from-hf", help="start from a Hugging Face model directory (config.json + safetensors)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
  cli.add_distributed_args(p)
  args = p.parse_intermixed_args(argv)   # options and key=value overrides mix in any order
  cli.prepare_devices(args.mesh)
  cli.init_distributed(args, args.overrides)

  from jaxllm.config import ConfigError, load_config
  from jaxllm.serve import complete_text
  from jaxllm.train.checkpoint import CheckpointError
  from jaxllm.train.loop import TrainingDiverged, train
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
  except (ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  from jaxllm.parallel.distributed import is_main_process
  if not is_main_process():
    return 0   # process 0 prints the run's summary
  if summary["first_loss"] is None:
    print(f"\nnothing to do: the checkpoint in {summary['checkpoint_dir']} is already at train.steps="
          f"{summary['steps']} (raise train.steps to continue: the learning rate keeps its schedule and stays "
          "at its floor past train.decay_steps; or set train.out_dir for a new run)")
  else:
    print(f"\ntrained to step {summary['steps']}: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"
          + (f", eval loss {summary['eval_loss']:.3f}" if summary["eval_loss"] is not None else "")
          + f"; step compile {summary['compile_s']:.1f}s")
  print(f"checkpoint: {summary['checkpoint_dir']}")
  if summary["sample"]:
    print("sample:\n" + "-" * 60 + "\n" + summary["sample"] + "\n" + "-" * 60)
  return 0


if __name__ == "__main__":
  cli.tune_malloc()
  sys.exit(main())
