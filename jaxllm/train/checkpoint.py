"""The trainer's checkpoints: async periodic saves of the full TrainState, keep-last-N, resume, and
restore onto any mesh. The layout on disk (params / opt_state / meta per step) is defined in
jaxllm.io.checkpoint, which also reads params for inference without the trainer.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from jaxllm.config import Config
from jaxllm.io.checkpoint import CheckpointError, manager, read_meta

__all__ = ["Checkpointer", "CheckpointError"]


class Checkpointer:
  """Save/restore TrainState + iterator position + config under `directory`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.mgr = manager(self.directory, keep, async_save)

  def latest_step(self) -> int | None:
    return self.mgr.latest_step()

  def save(self, step: int, state, data_state: dict, config: Config) -> None:
    meta = {"step": int(step), "data": data_state, "config": config.to_dict()}
    self.mgr.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave(meta),
      ),
    )

  def restore(self, abstract_state, step: int | None = None):
    """-> (params, opt_state, meta). abstract_state: TrainState of ShapeDtypeStructs with shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    try:
      out = self.mgr.restore(
        step,
        args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_state.params),
          opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
          meta=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # orbax raises many types; the user needs the step and the way out
      others = [s for s in self.mgr.all_steps() if s != step]
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} could not be read ({type(e).__name__}: {e}). "
        f"Nothing was changed on disk. If it is corrupt, move {os.path.join(self.directory, str(step))} "
        f"aside to resume from {max(others) if others else 'scratch'}; if the model or optimizer config "
        f"changed since it was written, restore the original config (saved in its meta) or use another "
        f"train.out_dir."
      ) from e
    return out.params, out.opt_state, out.meta

  def meta(self, step: int) -> dict:
    """The meta item of `step` (step, data position, resolved config), without loading arrays."""
    return read_meta(self.directory, step)

  def wait(self) -> None:
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()
