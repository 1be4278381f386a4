"""The training-checkpoint layout on disk, and reading parameters from it for inference.

A run's `train.out_dir/checkpoints/STEP/` holds three orbax items: `params` (canonical layout,
layers stacked [L, ...] in model order, so any mesh or one device can load it), `opt_state`, and
`meta` (step, data-iterator position, the resolved config). The trainer writes and resumes full
state (jaxllm.train.checkpoint); serving and RL read only `meta` and `params`, through here, without
importing the trainer.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jaxllm.config import Config, ConfigError, config_from_dict
from jaxllm.model.params import ModelDef, model_def

ITEMS = ("params", "opt_state", "meta")


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be used; the message says what to do."""


def manager(directory: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """The orbax CheckpointManager of a checkpoints directory (created if missing)."""
  # cleanup_tmp_directories: a save cut off by a kill leaves STEP.orbax-checkpoint-tmp; it is
  # never a restore candidate, so drop it when the next run opens the directory.
  opts = ocp.CheckpointManagerOptions(
    max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_names=ITEMS)


def read_meta(directory: str, step: int | None = None) -> dict:
  """The meta item (step, data position, config dict) of a checkpoint (default: the newest),
  without loading arrays."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(
      f"checkpoint directory {directory} does not exist; pass the train.out_dir/checkpoints folder of a training run"
    )
  mgr = manager(directory, async_save=False)
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(
      f"{directory} holds no finished checkpoint (a run writes them every train.save_every steps and at the end)"
    )
  path = os.path.join(directory, str(step), "meta", "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def read_config(directory: str, step: int | None = None) -> Config:
  """The resolved run config saved with a checkpoint."""
  meta = read_meta(directory, step)
  try:
    return config_from_dict(meta["config"])
  except (KeyError, ConfigError) as e:
    raise CheckpointError(f"the config saved in {directory} is not readable: {e}") from e


def load_params(directory: str, shardings: Callable[[ModelDef], Any] | None = None, step: int | None = None):
  """-> (Config, params) of a training checkpoint (default: the newest step). `shardings(mdef)`
  gives the target placement (e.g. jaxllm.parallel.param_shardings on a serving mesh); None puts
  everything on the first device."""
  meta = read_meta(directory, step)
  config = read_config(directory, meta["step"])
  mdef = model_def(config.model)
  abstract = mdef.abstract_params()
  if shardings is None:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
  else:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings(mdef))
  try:
    out = manager(directory, async_save=False).restore(
      meta["step"], args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
    )
  except Exception as e:  # orbax raises many types; the user needs the step and the way out
    raise CheckpointError(
      f"parameters of step {meta['step']} in {directory} could not be read "
      f"({type(e).__name__}: {e}); nothing was changed on disk"
    ) from e
  return config, out.params
