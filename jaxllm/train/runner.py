"""One run loop for every trainer: pretraining/SFT (jaxllm.train.loop), the reward model
(jaxllm.rl.reward_model) and RL (jaxllm.rl.loop).

`run` owns what every run shares, once: the run directory and its config.json, resuming from the
newest checkpoint, the checkpoint cadence (train.save_every and the last step), metrics.jsonl, the
progress bar and log lines, the divergence guard, and cleanup. On a multi-host run only process 0
writes files, logs and shows progress; checkpoints are written by all processes together.

A trainer supplies a `Task`: its state (fresh or restored), its step on its own batches, its
evaluation, and what a checkpoint carries besides the state. The task is built before `run` is
called, so a bad config, mesh, tokenizer or data set fails before any thread starts or any file is
touched.
"""

from __future__ import annotations

import dataclasses
import os
import time

from tqdm.auto import tqdm

from jaxllm.config import Config, ConfigError, save_config
from jaxllm.data import load_tokenizer
from jaxllm.parallel.distributed import is_main_process
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.metrics import MetricsWriter


def checked_tokenizer(cfg: Config):
  """The run's tokenizer, checked against model.vocab_size."""
  tokenizer = load_tokenizer(cfg.train.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(
      f"tokenizer {cfg.train.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size="
      f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}"
    )
  return tokenizer


class TrainingDiverged(RuntimeError):
  """Loss or gradients became NaN/inf; the update was not applied and the last good checkpoint is kept."""


class Task:
  """What a trainer supplies to `run`. `cfg` is the run's resolved config (saved to config.json and
  with every checkpoint); the methods below are called in the order listed."""

  cfg: Config
  name = "train"  # progress-bar label
  what = "loss or gradient"  # what became NaN/inf, in the divergence message
  hint = "Lower train.lr, raise train.warmup_steps or set train.grad_clip > 0"  # how to avoid divergence
  tokens_per_step = 0  # > 0: tokens_per_s is logged at train.log_every
  flops_per_token = 0.0  # with peak_flops > 0: MFU is logged beside tokens_per_s
  peak_flops = 0.0

  def init(self, ckpt: Checkpointer, start: int | None, log):
    """-> the state: restored from `ckpt` at step `start`, or fresh when `start` is None."""
    raise NotImplementedError

  def begin(self, state, step: int, fresh: bool, log) -> tuple[object, dict | None]:
    """Before the first step (start threads, evaluate): -> (state, a record for metrics.jsonl at
    `step`, or None). `fresh`: no checkpoint was resumed."""
    return state, None

  def step(self, state, step: int) -> tuple[object, dict]:
    """One update from `step` to step + 1: -> (state, record). The record's "finite" (bool, popped)
    says whether the update was finite; False stops the run with TrainingDiverged."""
    raise NotImplementedError

  def eval_due(self, step: int) -> bool:
    return False

  def evaluate(self, state, step: int) -> tuple[object, dict]:
    """-> (state, record entries) at the steps eval_due names (its time is left out of throughput)."""
    return state, {}

  def checkpoint(self, state, step: int) -> tuple[object, dict]:
    """-> (the state as saved, the data state saved beside it, e.g. the data position)."""
    raise NotImplementedError

  def postfix(self, record: dict) -> dict:
    """Progress-bar postfix of a step's record."""
    return {"loss": f"{record['loss']:.3f}"} if "loss" in record else {}

  def log_line(self, step: int, record: dict) -> str:
    """The log line of a step (without a progress bar, at train.log_every and at evaluations)."""
    return f"step {step:>6}  " + "  ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))

  def close(self) -> None:
    """Always called at the end, also after an error (stop threads)."""


@dataclasses.dataclass
class RunResult:
  state: object
  first: int  # the step this process started from
  step: int  # the step it stopped at
  history: list[dict]  # {"step", **record} of each step run here
  checkpoint_dir: str
  compile_s: float | None  # the first step's wall time (compile included)
  resumed: bool


class _NoMetrics:
  """The metrics sink of processes other than 0."""

  def write(self, step: int, values: dict) -> None:
    pass

  def close(self) -> None:
    pass


def run(task: Task, progress: bool = True, log=print, stop_after: int | None = None) -> RunResult:
  """Run (or resume) `task` to task.cfg.train.steps. `stop_after`: return after that many steps of
  this call without a final checkpoint (a test's stand-in for a kill)."""
  main = is_main_process()
  if not main:
    log, progress = (lambda *_: None), False
  t = task.cfg.train
  os.makedirs(t.out_dir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(t.out_dir, "checkpoints"), keep=t.keep_checkpoints)
  writer, bar = _NoMetrics(), None
  try:
    start = ckpt.latest_step() if t.resume else None
    state = task.init(ckpt, start, log)
    if start is not None:
      log(f"resumed from {ckpt.directory}/{start} (step {start})")
    first = step = start or 0
    if main:
      save_config(task.cfg, os.path.join(t.out_dir, "config.json"))
      writer = MetricsWriter(t.out_dir, resume_step=first)
    state, record = task.begin(state, step, start is None, log)
    if record and start is None:
      writer.write(step, record)
    history: list[dict] = []
    bar = tqdm(total=t.steps, initial=step, disable=not progress, desc=task.name, dynamic_ncols=True)
    t_run = t_window = time.perf_counter()
    tok_window, paused, compile_s = 0, 0.0, None
    while step < t.steps and (stop_after is None or step - first < stop_after):
      t0 = time.perf_counter()
      state, record = task.step(state, step)
      if not record.pop("finite"):
        last = ckpt.latest_step()
        details = ", ".join(f"{k}={record[k]}" for k in ("loss", "grad_norm") if k in record)
        raise TrainingDiverged(
          f"{task.what} became NaN/inf at step {step + 1}"
          + (f" ({details})" if details else "")
          + f"; the update was not applied and the last checkpoint in {ckpt.directory} "
          + (f"(step {last}) is kept" if last is not None else "(none yet) is untouched")
          + f". {task.hint}, then run again (it resumes from that checkpoint)."
        )
      step += 1
      if compile_s is None:
        compile_s = time.perf_counter() - t0
        t_window = time.perf_counter()  # throughput leaves the compiling step out
      else:
        tok_window += task.tokens_per_step
      if task.eval_due(step):
        t_eval = time.perf_counter()
        state, evaluation = task.evaluate(state, step)
        record.update(evaluation)
        t_window += time.perf_counter() - t_eval  # throughput and elapsed_s count training time only
        paused += time.perf_counter() - t_eval
      record["elapsed_s"] = time.perf_counter() - t_run - paused
      logged = step % t.log_every == 0 or step == t.steps
      if logged and task.tokens_per_step:
        dt = time.perf_counter() - t_window
        record["tokens_per_s"] = tps = tok_window / dt if dt > 0 and tok_window else float("nan")
        if task.peak_flops:
          record["mfu"] = tps * task.flops_per_token / task.peak_flops
        t_window, tok_window = time.perf_counter(), 0
      history.append({"step": step, **record})
      writer.write(step, record)
      bar.update(1)
      bar.set_postfix(**task.postfix(record))
      if not progress and (logged or task.eval_due(step)):
        log(task.log_line(step, record))
      if t.save_every and step % t.save_every == 0 or step == t.steps:
        ckpt.save(step, *task.checkpoint(state, step), task.cfg)
    if step >= t.steps and ckpt.latest_step() != step:
      ckpt.save(step, *task.checkpoint(state, step), task.cfg)
  finally:
    task.close()
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
  return RunResult(state, first, step, history, ckpt.directory, compile_s, start is not None)
