"""Next-token training on packed text: mesh, data, sharded state (fresh, resumed or imported from
Hugging Face), the jitted train and eval steps, and a generated sample at the end. The loop itself
(progress, metrics, checkpoints, the NaN stop) is jaxllm.train.runner's.

The same loss serves the step and eval: the model's own forward, or the pipeline when pp > 1 (whose
train state keeps the layers in the pipeline layout; checkpoints stay canonical, see train/state.py).
The end-of-run sample comes from a `sampler` the caller passes (train.py passes the serving engine's
`complete_text`), since the trainer does not import the serving layer."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from jaxllm.config import Config
from jaxllm.data import PackedBatches, default_corpus_text, eval_batches, split_train_eval
from jaxllm.data.sft import Row, build_stream, load_rows
from jaxllm.data.stream import StreamBatches, open_sources, parse_sources
from jaxllm.model.params import count_params, model_def
from jaxllm.parallel import build_mesh, format_rank_table, mesh_hooks
from jaxllm.parallel.distributed import global_batch, is_main_process, local_rows
from jaxllm.parallel.pipeline import Pipeline
from jaxllm.parallel.schedule import format_schedule, make_schedule
from jaxllm.parallel.sharding import batch_sharding
from jaxllm.train.metrics import measure_matmul_peak
from jaxllm.train.optim import lr_schedule, make_optimizer
from jaxllm.train.runner import Task, checked_tokenizer, run
from jaxllm.train.state import Layout, abstract_state, init_state, relayout, state_shardings
from jaxllm.train.step import TrainState, make_eval_step, make_train_step

# sampler(model_cfg, params, tokenizer, prompt, max_tokens, mesh=, plan=) -> prompt + continuation
Sampler = Callable[..., str]


def load_corpus(cfg: Config, tokenizer, log=print):
  """(train, eval) TokenStreams of train.data's rows (text, prompt/completion, messages; see
  jaxllm.data.sft) or of the embedded corpus. With SFT rows it logs their counts (rows truncated or
  dropped for train.long_rows, padding) and splits at a multiple of seq_len, where the rows' layout
  in sequences starts."""
  t = cfg.train
  rows = load_rows(list(t.data)) if t.data else [Row("text", default_corpus_text(t.max_corpus_bytes), "stdlib")]
  stream, stats = build_stream(rows, tokenizer, t.seq_len, t.long_rows)
  if stats.sft_rows:
    log(stats.describe(t.seq_len))
  return split_train_eval(stream, align=t.seq_len if stats.sft_rows else 1)


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
  pipe = (
    Pipeline(mdef, mesh, plan, cfg.mesh.microbatches, cfg.mesh.schedule, remat=cfg.model.remat == "full")
    if cfg.mesh.pp > 1
    else None
  )
  hk, b_sh = mesh_hooks(mesh, plan, cfg.model), batch_sharding(mesh, plan)
  step = make_train_step(mdef, tx, shardings, b_sh, cfg.train.grad_accum, hook_kwargs=hk, pipeline=pipe)
  return step, make_eval_step(mdef, shardings.params, b_sh, hook_kwargs=hk, pipeline=pipe)


class Pretraining(Task):
  """Next-token training on packed rows (pretraining text, and SFT rows whose loss covers only their
  completions / assistant turns; jaxllm.data.sft): the runner's Task."""

  name = "train"

  def __init__(self, cfg: Config, log=print):
    self.cfg = cfg
    t = cfg.train
    self.mesh, self.plan = build_mesh(cfg.mesh)
    self.tokenizer = checked_tokenizer(cfg)
    # This process loads only the rows of each global batch its devices hold (all of them single-process);
    # the window order and the checkpointed position are global, so any process count resumes them.
    self.b_sh, self.shape = batch_sharding(self.mesh, self.plan), (t.batch_size, t.seq_len)
    rows = local_rows(self.b_sh, self.shape)
    rows = None if len(rows) == t.batch_size else rows
    # Document masks: segment ids, loss mask (and positions) from the rows' closing eos, in train and eval;
    # SFT rows also mask their prompt / template tokens out of the loss (the streams' loss_mask).
    docs = dict(eos_id=self.tokenizer.eos_id if t.document_masks else None, reset_positions=t.reset_positions)
    sources = parse_sources(t.data)
    if sources is None:  # files or the embedded corpus, tokenized into memory
      train_tokens, eval_tokens = load_corpus(cfg, self.tokenizer, log)
      self.batches = PackedBatches(
        train_tokens.tokens, t.seq_len, t.batch_size, seed=t.seed, rows=rows, **docs, **train_tokens.streams()
      )
      self.eval_set = (
        eval_batches(
          eval_tokens.tokens, t.seq_len, t.batch_size, t.eval_batches, rows=rows, **docs, **eval_tokens.streams()
        )
        if t.eval_every
        else []
      )
      self.train_tokens = len(train_tokens)
    else:  # prepared directories (jaxllm.data.prepare), streamed from disk
      self.batches = StreamBatches(
        open_sources(sources, t.seq_len, self.tokenizer), t.seq_len, t.batch_size, seed=t.seed, rows=rows, **docs
      )
      self.eval_set = self.batches.eval_batches(t.eval_batches) if t.eval_every else []
      self.train_tokens = self.batches.train_tokens
      log(self.batches.describe())
    self.mdef = model_def(cfg.model)
    self.layout = Layout.of(self.plan)
    self.tokens_per_step = t.batch_size * t.seq_len
    self.flops_per_token = cfg.model.flops_per_token(t.seq_len)
    self.last_eval = None
    log(format_rank_table(self.mesh, self.plan))
    if cfg.mesh.pp > 1:
      log(format_schedule(make_schedule(cfg.mesh.schedule, cfg.mesh.pp, cfg.mesh.vpp, cfg.mesh.microbatches)))

  def init(self, ckpt, start, log):
    self.cfg = resolve_continuation(self.cfg, ckpt.meta(start)["config"] if start is not None else None)
    cfg, t, mdef = self.cfg, self.cfg.train, self.mdef
    self.tx = make_optimizer(t, mdef.logical)
    self.schedule = lr_schedule(t)
    self.shardings = state_shardings(mdef, self.tx, self.mesh, self.plan)  # in memory
    self.disk = state_shardings(mdef, self.tx, self.mesh, self.plan, layout=Layout())  # canonical: checkpoints
    if start is not None:
      params, opt_state, meta = ckpt.restore(abstract_state(mdef, self.tx, self.disk), start)
      state = relayout(
        self.tx,
        TrainState(params, opt_state, jax.device_put(np.int32(meta["step"]), self.disk.step)),
        self.layout,
        self.shardings,
        to_memory=True,
      )
      self.batches.restore(meta["data"])
    elif t.init_from_hf:
      from jaxllm.io import load_hf

      _, params = load_hf(t.init_from_hf, shardings=self.disk.params, cfg=cfg.model)
      state = init_state(mdef, self.tx, self.shardings, t.seed, params=params, layout=self.layout)
      log(f"initialised from Hugging Face checkpoint {t.init_from_hf}")
    else:
      state = init_state(mdef, self.tx, self.shardings, t.seed, layout=self.layout)
    self.n_params = count_params(mdef.abstract_params())
    log(
      f"model {cfg.model.name}: {self.n_params / 1e6:.2f}M params ({cfg.model.param_counts()['active'] / 1e6:.2f}M "
      f"active), {self.train_tokens:,} train tokens, {self.batches.batches_per_epoch} batches/epoch"
    )
    self.step_fn, self.eval_fn = build_steps(cfg, mdef, self.tx, self.mesh, self.plan, self.shardings)
    # (measured on one of this process's own devices; the CPU matmul already uses every core)
    self.peak_flops = measure_matmul_peak(cfg.model.dtype, device=jax.local_devices()[0]) * (
      jax.process_count() if jax.devices()[0].platform == "cpu" else len(jax.devices())
    )
    return state

  def step(self, state, step):
    t0 = time.perf_counter()
    batch = next(self.batches)
    data_wait = time.perf_counter() - t0  # the step's wait on its batch (prefetched: ~0)
    state, metrics = self.step_fn(state, global_batch(self.b_sh, batch, self.shape))
    m = jax.device_get(metrics)
    record = {
      "finite": bool(m["finite"]),
      "loss": float(m["loss"]),
      "aux_loss": float(m["aux_loss"]),
      "grad_norm": float(m["grad_norm"]),
      "lr": float(self.schedule(step)),  # the rate this update used (optimizer count = step)
      "data_wait_s": data_wait,
    }
    if isinstance(self.batches, StreamBatches):  # target tokens each source has given so far
      record.update({f"tokens/{k}": v for k, v in self.batches.consumed_tokens().items()})
    return state, record

  def eval_due(self, step):
    return bool(self.cfg.train.eval_every and step % self.cfg.train.eval_every == 0 and self.eval_set)

  def evaluate(self, state, step):
    sums = np.sum(
      [jax.device_get(self.eval_fn(state.params, global_batch(self.b_sh, b, self.shape))) for b in self.eval_set],
      axis=0,
    )
    self.last_eval = float(sums[0] / max(sums[1], 1.0))
    return state, {"eval_loss": self.last_eval}

  def checkpoint(self, state, step):
    return relayout(self.tx, state, self.layout, self.disk, to_memory=False), self.batches.state()

  def postfix(self, r):
    if "tokens_per_s" not in r:
      return {"loss": f"{r['loss']:.3f}"}
    return {"loss": f"{r['loss']:.3f}", "tok_s": f"{r['tokens_per_s']:,.0f}", "mfu": f"{100 * r['mfu']:.1f}%"}

  def log_line(self, step, r):
    return (
      f"step {step:>6}  loss {r['loss']:.4f}  grad_norm {r['grad_norm']:.3f}"
      + (f"  {r['tokens_per_s']:,.0f} tok/s  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
      + (f"  eval {r['eval_loss']:.4f}" if "eval_loss" in r else "")
      + f"  data wait {1000 * r['data_wait_s']:.2f} ms"
    )

  def close(self):
    if isinstance(self.batches, StreamBatches):
      self.batches.close()  # the prefetch thread


def train(
  cfg: Config, stop_after: int | None = None, progress: bool = True, log=print, sampler: Sampler | None = None
) -> dict:
  """Run (or resume) training to cfg.train.steps. `stop_after` ends this process early after that
  many steps (used to emulate a kill in tests). `sampler` generates the end-of-run sample (none
  without it). Returns a summary dict.

  Multi-host (after jaxllm.parallel.distributed.initialize): every process calls this with the same
  config and runs the same steps; each loads only the batch rows its devices hold (jaxllm.train.runner
  keeps logs, progress and files to process 0)."""
  if not is_main_process():
    log = lambda *_: None  # noqa: E731
  task = Pretraining(cfg, log)
  res = run(task, progress=progress, log=log, stop_after=stop_after)
  t = task.cfg.train
  sample = None
  if sampler is not None and t.sample_tokens and res.step >= t.steps:
    sample = sampler(
      task.cfg.model,
      task.layout.params_out(res.state.params),
      task.tokenizer,
      t.sample_prompt,
      t.sample_tokens,
      mesh=task.mesh,
      plan=task.plan,
    )
  losses = [h["loss"] for h in res.history]
  return {
    "steps": res.step,
    "first_loss": losses[0] if losses else None,
    "last_loss": losses[-1] if losses else None,
    "eval_loss": task.last_eval,
    "compile_s": res.compile_s,
    "checkpoint_dir": res.checkpoint_dir,
    "history": res.history,
    "sample": sample,
    "params": task.n_params,
  }
