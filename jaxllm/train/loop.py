"""The training run: mesh, data, sharded state (fresh, resumed or imported), the jitted step in a
loop with progress, eval, metrics, NaN stop, checkpoints, and a generated sample at the end.

The same loss serves the step and eval: the model's own forward, or the pipeline when pp > 1 (whose
train state keeps the layers in the pipeline layout; checkpoints stay canonical, see train/state.py).
The end-of-run sample comes from a `sampler` the caller passes (train.py passes the serving engine's
`complete_text`), since the trainer does not import the serving layer."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxllm.config import Config, ConfigError, save_config
from jaxllm.data import PackedBatches, default_corpus_text, eval_batches, load_texts, load_tokenizer, \
  split_train_eval, tokenize_documents
from jaxllm.model.params import count_params, model_def
from jaxllm.parallel import build_mesh, format_rank_table, mesh_hooks
from jaxllm.parallel.distributed import global_batch, is_main_process, local_rows
from jaxllm.parallel.pipeline import Pipeline
from jaxllm.parallel.schedule import format_schedule, make_schedule
from jaxllm.parallel.sharding import batch_sharding
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.metrics import MetricsWriter, measure_matmul_peak
from jaxllm.train.optim import lr_schedule, make_optimizer
from jaxllm.train.state import Layout, abstract_state, init_state, relayout, state_shardings
from jaxllm.train.step import TrainState, make_eval_step, make_train_step

# sampler(model_cfg, params, tokenizer, prompt, max_tokens, mesh=, plan=) -> prompt + continuation
Sampler = Callable[..., str]


class _NoMetrics:
  """The metrics sink of processes other than 0 (process 0 writes metrics.jsonl for the run)."""

  def write(self, step: int, values: dict) -> None:
    pass

  def close(self) -> None:
    pass


class TrainingDiverged(RuntimeError):
  """Loss or gradients became NaN/inf; the last good checkpoint is kept."""


def load_corpus(cfg: Config, tokenizer):
  if cfg.train.data:
    texts = load_texts(list(cfg.train.data))
  else:
    texts = [default_corpus_text(cfg.train.max_corpus_bytes)]
  tokens = tokenize_documents(texts, tokenizer)
  return split_train_eval(tokens)


def resolve_continuation(cfg: Config, saved: dict | None) -> Config:
  """Fix the LR-schedule horizon: `train.decay_steps` given, else the one saved with the run being
  resumed (older checkpoints: their train.steps), else this start's train.steps."""
  if cfg.train.decay_steps:
    return cfg
  saved_train = (saved or {}).get("train", {})
  horizon = saved_train.get("decay_steps") or saved_train.get("steps") or cfg.train.steps
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, decay_steps=int(horizon)))


def build_steps(cfg: Config, mdef, tx, mesh, plan, shardings):
  """The jitted train and eval steps for this mesh (through the pipeline when pp > 1)."""
  # model.remat="full" keeps only each chunk's input per microbatch and recomputes the chunk in the
  # backward; "none" / "dots" keep what the per-layer policy saves (Megatron's default: no recompute).
  pipe = (Pipeline(mdef, mesh, plan, cfg.mesh.microbatches, cfg.mesh.schedule, remat=cfg.model.remat == "full")
          if cfg.mesh.pp > 1 else None)
  hk, b_sh = mesh_hooks(mesh, plan, cfg.model), batch_sharding(mesh, plan)
  step = make_train_step(mdef, tx, shardings, b_sh, cfg.train.grad_accum, hook_kwargs=hk, pipeline=pipe)
  return step, make_eval_step(mdef, shardings.params, b_sh, hook_kwargs=hk, pipeline=pipe)


def train(cfg: Config, stop_after: int | None = None, progress: bool = True, log=print,
          sampler: Sampler | None = None) -> dict:
  """Run (or resume) training to cfg.train.steps. `stop_after` ends this process early after that
  many steps (used to emulate a kill in tests). `sampler` generates the end-of-run sample (none
  without it). Returns a summary dict.

  Multi-host (after jaxllm.parallel.distributed.initialize): every process calls this with the same
  config and runs the same steps; each loads only the batch rows its devices hold, and only process 0
  logs, shows progress and writes metrics.jsonl / config.json (checkpoints are written cooperatively)."""
  main = is_main_process()
  if not main:
    log, progress = (lambda *_: None), False
  os.makedirs(cfg.train.out_dir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(cfg.train.out_dir, "checkpoints"), keep=cfg.train.keep_checkpoints)
  start = ckpt.latest_step() if cfg.train.resume else None
  cfg = resolve_continuation(cfg, ckpt.meta(start)["config"] if start is not None else None)
  t = cfg.train
  mesh, plan = build_mesh(cfg.mesh)
  log(format_rank_table(mesh, plan))
  if cfg.mesh.pp > 1:
    log(format_schedule(make_schedule(cfg.mesh.schedule, cfg.mesh.pp, cfg.mesh.vpp, cfg.mesh.microbatches)))

  tokenizer = load_tokenizer(t.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"tokenizer {t.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size="
                      f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
  train_tokens, eval_tokens = load_corpus(cfg, tokenizer)
  # This process loads only the rows of each global batch its devices hold (all of them single-process);
  # the window order and the checkpointed position are global, so any process count resumes them.
  b_sh, shape = batch_sharding(mesh, plan), (t.batch_size, t.seq_len)
  rows = local_rows(b_sh, shape)
  rows = None if len(rows) == t.batch_size else rows
  # Document masks: segment ids, loss mask (and positions) from the eos separators, in train and eval.
  docs = dict(eos_id=tokenizer.eos_id if t.document_masks else None, reset_positions=t.reset_positions)
  batches = PackedBatches(train_tokens, t.seq_len, t.batch_size, seed=t.seed, rows=rows, **docs)
  eval_set = eval_batches(eval_tokens, t.seq_len, t.batch_size, t.eval_batches, rows=rows, **docs) if t.eval_every else []

  mdef = model_def(cfg.model)
  tx = make_optimizer(t, mdef.logical)
  layout = Layout.of(plan)
  shardings = state_shardings(mdef, tx, mesh, plan)                   # in memory
  disk = state_shardings(mdef, tx, mesh, plan, layout=Layout())       # canonical: checkpoints
  if start is not None:
    params, opt_state, meta = ckpt.restore(abstract_state(mdef, tx, disk), start)
    state = relayout(tx, TrainState(params, opt_state, jax.device_put(np.int32(meta["step"]), disk.step)),
                     layout, shardings, to_memory=True)
    batches.restore(meta["data"])
    log(f"resumed from {ckpt.directory}/{start} (step {start})")
  elif t.init_from_hf:
    from jaxllm.io import load_hf
    _, params = load_hf(t.init_from_hf, shardings=disk.params, cfg=cfg.model)
    state = init_state(mdef, tx, shardings, t.seed, params=params, layout=layout)
    log(f"initialised from Hugging Face checkpoint {t.init_from_hf}")
  else:
    state = init_state(mdef, tx, shardings, t.seed, layout=layout)
  if main:
    save_config(cfg, os.path.join(t.out_dir, "config.json"))
  n_params = count_params(mdef.abstract_params())
  log(f"model {cfg.model.name}: {n_params / 1e6:.2f}M params ({cfg.model.param_counts()['active'] / 1e6:.2f}M "
      f"active), {len(train_tokens):,} train tokens, {batches.batches_per_epoch} batches/epoch")

  step_fn, eval_fn = build_steps(cfg, mdef, tx, mesh, plan, shardings)
  schedule = lr_schedule(t)
  # (measured on one of this process's own devices; the CPU matmul already uses every core)
  peak = measure_matmul_peak(cfg.model.dtype, device=jax.local_devices()[0]) * (
    jax.process_count() if jax.devices()[0].platform == "cpu" else len(jax.devices()))
  flops_tok = cfg.model.flops_per_token(t.seq_len)
  writer = MetricsWriter(t.out_dir, resume_step=int(state.step)) if main else _NoMetrics()

  step = int(state.step)
  first_step, losses, history = step, [], []
  last_eval = None
  bar = tqdm(total=t.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
  t_window, tok_window, compile_s = time.perf_counter(), 0, None
  try:
    while step < t.steps and (stop_after is None or step - first_step < stop_after):
      batch = global_batch(b_sh, next(batches), shape)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch)
      metrics = jax.device_get(metrics)
      if compile_s is None:
        compile_s = time.perf_counter() - t0
        t_window = time.perf_counter()
      else:
        tok_window += t.batch_size * t.seq_len
      if not metrics["finite"]:
        raise TrainingDiverged(
          f"loss or gradient became NaN/inf at step {step + 1} (loss={metrics['loss']}, grad_norm="
          f"{metrics['grad_norm']}); the update was not applied and the last checkpoint in {ckpt.directory} "
          f"(step {ckpt.latest_step()}) is kept. Lower train.lr, raise train.warmup_steps or set "
          "train.grad_clip > 0, then run again (it resumes from that checkpoint).")
      step += 1
      loss = float(metrics["loss"])
      losses.append(loss)
      history.append({"step": step, "loss": loss})
      bar.update(1)
      record = {"loss": loss, "aux_loss": float(metrics["aux_loss"]), "grad_norm": float(metrics["grad_norm"]),
                "lr": float(schedule(step - 1))}   # the rate this update used (optimizer count step-1)
      if t.eval_every and step % t.eval_every == 0 and eval_set:
        t_eval = time.perf_counter()
        sums = np.sum([jax.device_get(eval_fn(state.params, global_batch(b_sh, b, shape))) for b in eval_set], axis=0)
        last_eval = float(sums[0] / max(sums[1], 1.0))
        t_window += time.perf_counter() - t_eval   # throughput counts training time only
        record["eval_loss"] = last_eval
      if step % t.log_every == 0 or step == t.steps:
        dt = time.perf_counter() - t_window
        tps = tok_window / dt if dt > 0 and tok_window else float("nan")
        record.update(tokens_per_s=tps, mfu=tps * flops_tok / peak)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * record['mfu']:.1f}%")
        if not progress:
          log(f"step {step:>6}  loss {loss:.4f}  grad_norm {record['grad_norm']:.3f}  "
              f"{tps:,.0f} tok/s  MFU {100 * record['mfu']:.1f}%"
              + (f"  eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""))
        t_window, tok_window = time.perf_counter(), 0
      writer.write(step, record)
      if t.save_every and step % t.save_every == 0:
        ckpt.save(step, relayout(tx, state, layout, disk, to_memory=False), batches.state(), cfg)
    if stop_after is None or step >= t.steps:
      if ckpt.latest_step() != step:
        ckpt.save(step, relayout(tx, state, layout, disk, to_memory=False), batches.state(), cfg)
  finally:
    bar.close()
    ckpt.close()
    writer.close()

  sample = None
  if sampler is not None and t.sample_tokens and step >= t.steps:
    sample = sampler(cfg.model, layout.params_out(state.params), tokenizer, t.sample_prompt, t.sample_tokens, mesh=mesh, plan=plan)
  summary = {"steps": step, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
             "eval_loss": last_eval, "compile_s": compile_s, "checkpoint_dir": ckpt.directory,
             "history": history, "sample": sample, "params": n_params}
  return summary
