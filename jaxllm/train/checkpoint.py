"""Checkpoints with orbax CheckpointManager: async periodic saves, keep-last-N, resume, and restore
onto any mesh. Layout per step: `params` (canonical [L, ...] layout, so any mesh or a single device
can load it), `opt_state`, and `meta` (step, data-iterator position, the resolved config).
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from jaxllm.config import Config, ConfigError, config_from_dict


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be used; the message says what to do."""


def _manager(directory: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save cut off by a kill leaves STEP.orbax-checkpoint-tmp; it is
  # never a restore candidate, so drop it when the next run opens the directory.
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                      create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                               item_names=("params", "opt_state", "meta"))


class Checkpointer:
  """Save/restore TrainState + iterator position + config under `directory`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.mgr = _manager(self.directory, keep, async_save)

  def latest_step(self) -> int | None:
    return self.mgr.latest_step()

  def save(self, step: int, state, data_state: dict, config: Config) -> None:
    meta = {"step": int(step), "data": data_state, "config": config.to_dict()}
    self.mgr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave(meta)))

  def restore(self, abstract_state, step: int | None = None):
    """-> (params, opt_state, meta). abstract_state: TrainState of ShapeDtypeStructs with shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    try:
      out = self.mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
        meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; the user needs the step and the way out
      others = [s for s in self.mgr.all_steps() if s != step]
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} could not be read ({type(e).__name__}: {e}). "
        f"Nothing was changed on disk. If it is corrupt, move {os.path.join(self.directory, str(step))} "
        f"aside to resume from {max(others) if others else 'scratch'}; if the model or optimizer config "
        f"changed since it was written, restore the original config (saved in its meta) or use another "
        f"train.out_dir.") from e
    return out.params, out.opt_state, out.meta

  def wait(self) -> None:
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


def read_meta(directory: str, step: int | None = None) -> dict:
  """The meta item (step, data position, config dict) of a checkpoint, without loading arrays."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist; pass the train.out_dir/"
                          "checkpoints folder of a training run")
  mgr = _manager(directory, async_save=False)
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{directory} holds no finished checkpoint (a run writes them every "
                          "train.save_every steps and at the end)")
  path = os.path.join(directory, str(step), "meta", "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return meta


def load_params(directory: str, mesh=None, plan=None, step: int | None = None):
  """-> (Config, params) from a training checkpoint, placed on `mesh` (any mesh; None = one device)."""
  from jaxllm.model.params import model_def
  from jaxllm.parallel.mesh import build_mesh
  from jaxllm.train.state import param_shardings
  from jaxllm.config import MeshConfig
  meta = read_meta(directory, step)
  try:
    config = config_from_dict(meta["config"])
  except (KeyError, ConfigError) as e:
    raise CheckpointError(f"the config saved in {directory} is not readable: {e}") from e
  if mesh is None:
    mesh, plan = build_mesh(MeshConfig(name="cpu-1"), jax.devices()[:1])
  mdef = model_def(config.model)
  shardings = param_shardings(mdef, mesh, plan)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          mdef.abstract_params(), shardings)
  mgr = _manager(directory, async_save=False)
  try:
    out = mgr.restore(meta["step"], args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
  except Exception as e:
    raise CheckpointError(f"parameters of step {meta['step']} in {directory} could not be read "
                          f"({type(e).__name__}: {e})") from e
  return config, out.params
