"""Reward models: the shared decoder with a scalar head, trained on preference pairs with the
Bradley-Terry loss through jaxllm.train's one train step. `train.py reward` trains one; the reward
"rm:DIR" (jaxllm.rl.rewards) loads it and scores RL completions.

Model (Stiennon et al. 2020, "Learning to summarize from human feedback"; Ouyang et al. 2022,
"Training language models to follow instructions with human feedback" (InstructGPT), sec. 3.5): the
policy's architecture (jaxllm.model), randomly initialised or loaded from a checkpoint such as an SFT
run (`reward.init_from`), whose LM head goes unused; a linear head reads the final hidden state (after
the last norm) at the last real token of prompt + completion:

  r(x, y) = w . h + b         h [D]: final hidden state at the last non-padding token of x + y

Sequences are right-padded, so under causal attention no padding reaches that position and padding
never changes a score. The parameters are one pytree, {"backbone": <model params>, "head": {"w": [D],
"b": []}}, that the train step, optax, the shardings (the backbone's by its logical axis names, the
head replicated) and the trainer's Checkpointer handle like any other.

Loss (Bradley & Terry 1952; InstructGPT eq. 1): for a pair in which completion y_c is preferred to y_r,

  loss = -log sigmoid(r(x, y_c) - r(x, y_r)),   averaged over the step's pairs.

It is an Objective of jaxllm.train.step whose count is the number of pairs (the one denominator), so
a reward model trains with the same step, optimizer, clipping, NaN guard, shardings and checkpoints
as pretraining and RL; there is no second trainer. A batch holds tokens [B, 2, T] and lengths
[B, 2] (index 0 chosen, 1 rejected), so a pair is one row and gradient-accumulation chunks and
data-parallel shards never split a pair.

Offset and score. The loss sees only score differences, so b gets no gradient. InstructGPT sets the
offset afterwards ("normalize the reward model using a bias so that the labeler demonstrations achieve
a mean score of 0"); here every evaluation re-sets b so that the held-out completions, chosen and
rejected together, average 0. The reward "rm:DIR" is sigmoid(r) in (0, 1): 0.5 at that centre, and
under the Bradley-Terry model the probability that the completion is preferred to one scoring 0, on
the same 0..1 scale as exact_match. `RewardModel.raw_scores` gives r itself.

Data: jsonl, one object a line, {"prompt": str, "chosen": str, "rejected": str} (other keys are
ignored); the completions follow the prompt directly. Prompt and completion are tokenised separately
and concatenated, as the RL loop feeds prompt ids + generated ids. A sequence longer than train.seq_len
loses the start of its prompt (the head reads the end). Held-out pairs are `reward.eval_data`, or else
a `reward.eval_fraction` of `reward.data` chosen by a hash of the prompt (pairs sharing a prompt share
a split). AdditionTask.write_preference_file (jaxllm.data.tasks) writes a checkable preference task.

Config: `jaxllm.config.RewardConfig` (the [reward] table, or reward.key=value) holds what is specific
to reward models; the optimiser, steps, batch size (pairs per step), seq_len, output directory, seed,
and log/eval/save intervals are train.*, the model model.* (or the init_from run's). The loop is
jaxllm.train.runner's.

Shapes: the package legend in jaxllm/__init__.py (B pairs, or sequences when flattened; T; D).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.buckets import pow2_bucket
from jaxllm.config import Config, ConfigError, ModelConfig, RewardConfig
from jaxllm.data import load_tokenizer
from jaxllm.data.corpus import jsonl_records
from jaxllm.data.loader import epoch_indices
from jaxllm.data.tasks import PreferencePair
from jaxllm.io import load_model
from jaxllm.io.checkpoint import CheckpointError, manager, read_config, read_meta
from jaxllm.model import hooks
from jaxllm.model.params import ModelDef, count_params, init_params, model_def
from jaxllm.model.transformer import aux_loss
from jaxllm.parallel import build_mesh, mesh_hooks, opt_state_shardings, param_shardings
from jaxllm.parallel.sharding import batch_sharding
from jaxllm.train.optim import lr_schedule, make_optimizer
from jaxllm.train.runner import Task, checked_tokenizer, run
from jaxllm.train.state import init_state
from jaxllm.train.step import Objective, TrainState, make_train_step

KIND = "reward_model"  # meta["data"]["kind"] of a reward-model checkpoint


# ---- data ----

FIELDS = ("prompt", "chosen", "rejected")


def read_preference_pairs(path: str) -> list[PreferencePair]:
  """The pairs of a jsonl file; a malformed line is a ValueError naming the file, the line and what
  is wrong with it. Blank lines are skipped."""
  if not os.path.isfile(path):
    raise ValueError(
      f"preference data {path!r} does not exist; give a jsonl file of "
      '{"prompt", "chosen", "rejected"} lines (AdditionTask.write_preference_file writes one)'
    )
  pairs = []
  for where, record in jsonl_records(path, 'one JSON object {"prompt": ..., "chosen": ..., "rejected": ...}'):
    if not isinstance(record, dict):
      raise ValueError(
        f"{where}: expected a JSON object with string fields {', '.join(FIELDS)}, found a {type(record).__name__}"
      )
    missing = [k for k in FIELDS if k not in record]
    if missing:
      raise ValueError(
        f"{where}: missing {', '.join(map(repr, missing))} (the line has "
        f"{', '.join(map(repr, sorted(record))) or 'no keys'}); each line needs "
        f"{', '.join(FIELDS)}"
      )
    for k in FIELDS:
      if not isinstance(record[k], str):
        raise ValueError(f"{where}: {k!r} must be a string, got {type(record[k]).__name__} ({record[k]!r:.40})")
    if record["chosen"] == record["rejected"]:
      raise ValueError(f"{where}: 'chosen' and 'rejected' are the same text; a pair must differ")
    if not record["prompt"] and not (record["chosen"] and record["rejected"]):
      raise ValueError(f"{where}: empty prompt and an empty completion leave nothing to score")
    pairs.append(PreferencePair(record["prompt"], record["chosen"], record["rejected"]))
  if not pairs:
    raise ValueError(f"{path} holds no preference pairs")
  return pairs


def _heldout(prompt: str, fraction: float) -> bool:
  h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
  return h / 2**64 < fraction


def load_pairs(rcfg: RewardConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
  """(train pairs, held-out pairs) of a RewardConfig."""
  if not rcfg.data:
    raise ConfigError(
      "no preference data: pass --data FILE.jsonl (or reward.data=FILE.jsonl), lines of "
      '{"prompt", "chosen", "rejected"}'
    )
  pairs = read_preference_pairs(rcfg.data)
  if rcfg.eval_data:
    return pairs, read_preference_pairs(rcfg.eval_data)
  train = [p for p in pairs if not _heldout(p.prompt, rcfg.eval_fraction)]
  held = [p for p in pairs if _heldout(p.prompt, rcfg.eval_fraction)]
  if not train or not held:
    raise ConfigError(
      f"{rcfg.data}: holding out reward.eval_fraction={rcfg.eval_fraction} of its "
      f"{len(pairs)} pairs by prompt leaves {len(train)} to train on and {len(held)} held out; "
      "give more pairs, another eval_fraction, or reward.eval_data=FILE"
    )
  return train, held


def encode(tokenizer, prompt: str, completion: str) -> list[int]:
  """Token ids of prompt + completion, each tokenised on its own (as the RL loop's prompt ids +
  generated ids)."""
  return list(tokenizer.encode(prompt)) + list(tokenizer.encode(completion))


def pad_id(tokenizer) -> int:
  return tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else 0


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer, seq_len: int) -> tuple[dict, int]:
  """-> ({"tokens": int32 [B, 2, T] right-padded, "lengths": int32 [B, 2]}, pairs that lost the start
  of their prompt), T = the longest sequence rounded up to a power of two, at most seq_len; a longer
  sequence keeps its last seq_len tokens."""
  seqs = [(encode(tokenizer, p.prompt, p.chosen), encode(tokenizer, p.prompt, p.rejected)) for p in pairs]
  T = min(seq_len, pow2_bucket(max(len(ids) for pair in seqs for ids in pair), 16))
  tokens = np.full((len(pairs), 2, T), pad_id(tokenizer), np.int32)
  lengths = np.zeros((len(pairs), 2), np.int32)
  for i, pair in enumerate(seqs):
    for j, ids in enumerate(pair):
      ids = ids[-T:]
      tokens[i, j, : len(ids)], lengths[i, j] = ids, len(ids)
  return {"tokens": tokens, "lengths": lengths}, sum(max(map(len, pair)) > T for pair in seqs)


# ---- the model: backbone + scalar head ----


def rm_logical(mdef: ModelDef) -> dict:
  """Logical axis names of the reward model's params (for the optimizer's decay mask): the head's
  [D] vector and scalar bias are not decayed."""
  return {"backbone": mdef.logical, "head": {"w": ("embed",), "b": ()}}


def abstract_rm_params(mdef: ModelDef) -> dict:
  f32 = jnp.float32
  return {
    "backbone": mdef.abstract_params(),
    "head": {"w": jax.ShapeDtypeStruct((mdef.cfg.d_model,), f32), "b": jax.ShapeDtypeStruct((), f32)},
  }


def init_head(cfg: ModelConfig, seed: int) -> dict:
  """w ~ N(0, init_std^2) (scores start near 0, every pair nearly a tie), b = 0."""
  w = jax.random.normal(jax.random.key(seed), (cfg.d_model,), jnp.float32) * cfg.init_std
  return {"w": w, "b": jnp.zeros((), jnp.float32)}


def last_token_scores(mdef: ModelDef, params: dict, tokens, lengths):
  """tokens [B, T] int32 right-padded, lengths [B] int32 in 1..T -> (r [B] fp32, aux)."""
  h, aux, _ = mdef.bind(params["backbone"]).hidden(tokens)
  last = jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)
  h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # [B, D]
  head = params["head"]
  return h_last @ head["w"] + head["b"], aux


def pair_scores(mdef: ModelDef, params: dict, batch: dict):
  """batch tokens [B, 2, T], lengths [B, 2] -> (r [B, 2] fp32: column 0 chosen, 1 rejected; aux)."""
  B, _, T = batch["tokens"].shape
  r, aux = last_token_scores(mdef, params, batch["tokens"].reshape(2 * B, T), batch["lengths"].reshape(2 * B))
  return r.reshape(B, 2), aux


def bradley_terry_sums(r_chosen, r_rejected):
  """r [B] each -> (sum of -log sigmoid(r_c - r_r), pairs ranked right (r_c > r_r), sum of r_c - r_r)."""
  margin = r_chosen - r_rejected
  return jnp.sum(jax.nn.softplus(-margin)), jnp.sum((margin > 0).astype(jnp.float32)), jnp.sum(margin)


def bradley_terry_loss(r_chosen, r_rejected):
  """The mean Bradley-Terry loss of B pairs (InstructGPT eq. 1)."""
  return bradley_terry_sums(r_chosen, r_rejected)[0] / r_chosen.shape[0]


def _preference_sums(mdef, params, batch):
  r, aux = pair_scores(mdef, params, batch)
  loss, right, margin = bradley_terry_sums(r[:, 0], r[:, 1])
  return loss, aux_loss(mdef.cfg, aux), {"loss": loss, "accuracy": right, "margin": margin}


# The train step's objective: BT loss summed over pairs, divided once by the step's pair count; the
# step reports loss, accuracy (pairs ranked right) and margin as means over pairs.
PREFERENCE = Objective(count=lambda b: jnp.float32(b["lengths"].shape[0]), sums=_preference_sums)


def rm_shardings(mdef: ModelDef, tx, mesh, plan) -> TrainState:
  """TrainState of NamedShardings: the backbone by its logical names, the head replicated,
  optimizer moments following their parameter."""
  rep = NamedSharding(mesh, P())
  p_sh = {"backbone": param_shardings(mdef, mesh, plan), "head": {"w": rep, "b": rep}}
  return TrainState(p_sh, opt_state_shardings(tx, abstract_rm_params(mdef), p_sh, mesh), rep)


def abstract_rm_state(mdef: ModelDef, tx, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings: the restore target of a reward-model checkpoint."""
  shapes = jax.eval_shape(lambda p: TrainState(p, tx.init(p), jnp.int32(0)), abstract_rm_params(mdef))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def make_score_step(mdef: ModelDef, params_shardings=None, batch_sharding=None, hook_kwargs: dict | None = None):
  """Jitted (params, pair batch) -> r [B, 2] (no gradient): held-out evaluation."""

  def scores(params, batch):
    with hooks.using(**(hook_kwargs or {})):
      return pair_scores(mdef, params, batch)[0]

  if params_shardings is None:
    return jax.jit(scores)
  # Replicated scores: every process of a multi-host run reads all of them.
  return jax.jit(
    scores, in_shardings=(params_shardings, batch_sharding), out_shardings=NamedSharding(batch_sharding.mesh, P())
  )


# ---- training (`train.py reward`) ----


class RewardTraining(Task):
  """Bradley-Terry training on preference pairs: the runner's Task. Each evaluation re-sets the
  head's offset b (module docstring), so the state it returns carries the new b."""

  name = "reward"
  what = "reward-model loss or gradient"
  hint = "Lower train.lr or set train.grad_clip > 0"

  def __init__(self, cfg: Config, log=print):
    rcfg = cfg.reward
    self.mesh, self.plan = build_mesh(cfg.mesh)
    self.backbone = None
    if rcfg.init_from:  # a checkpoints dir or a Hugging Face dir: the backbone's model and tokenizer
      base = load_model(rcfg.init_from, shardings=lambda m: param_shardings(m, self.mesh, self.plan))
      cfg = dataclasses.replace(
        cfg, model=base.cfg, train=dataclasses.replace(cfg.train, tokenizer=base.tokenizer_spec)
      )
      self.backbone = base.params
    self.cfg, t = cfg, cfg.train
    self.tok = checked_tokenizer(cfg)
    self.train_pairs, self.eval_pairs = load_pairs(rcfg)
    self.train_data, cut = encode_pairs(self.train_pairs, self.tok, t.seq_len)
    self.eval_data, cut_eval = encode_pairs(self.eval_pairs, self.tok, t.seq_len)
    if cut + cut_eval:
      log(f"{cut + cut_eval} pairs are longer than train.seq_len={t.seq_len} tokens; their prompts lose their start")
    self.T = max(self.train_data["tokens"].shape[-1], self.eval_data["tokens"].shape[-1])
    self.mdef = model_def(cfg.model)
    self.tx = make_optimizer(t, rm_logical(self.mdef))
    self.schedule = lr_schedule(t)
    self.shardings = rm_shardings(self.mdef, self.tx, self.mesh, self.plan)
    self.b_sh = batch_sharding(self.mesh, self.plan)
    hk = mesh_hooks(self.mesh, self.plan, cfg.model)
    self.step_fn = make_train_step(
      self.mdef, self.tx, self.shardings, self.b_sh, t.grad_accum, hook_kwargs=hk, objective=PREFERENCE
    )
    self.score_fn = make_score_step(self.mdef, self.shardings.params, self.b_sh, hk)
    self.evals: list[tuple[int, float]] = []

  def init(self, ckpt, start, log):
    mdef, t = self.mdef, self.cfg.train
    if start is not None:
      if ckpt.meta(start).get("data", {}).get("kind") != KIND:
        raise CheckpointError(
          f"{ckpt.directory} holds checkpoints that are not a reward model's; use another train.out_dir"
        )
      params, opt_state, meta = ckpt.restore(abstract_rm_state(mdef, self.tx, self.shardings), start)
      return TrainState(params, opt_state, jax.device_put(jnp.int32(meta["step"]), self.shardings.step))
    backbone = self.backbone
    if backbone is not None:
      log(f"backbone initialised from {self.cfg.reward.init_from}")
    else:
      backbone = jax.jit(lambda: init_params(self.cfg.model, t.seed), out_shardings=self.shardings.params["backbone"])()
    return init_state(
      mdef, self.tx, self.shardings, t.seed, params={"backbone": backbone, "head": init_head(self.cfg.model, t.seed)}
    )

  def begin(self, state, step, fresh, log):
    log(
      f"reward model {self.cfg.model.name}: {count_params(abstract_rm_params(self.mdef)) / 1e6:.2f}M params, "
      f"{len(self.train_pairs)} train pairs, {len(self.eval_pairs)} held-out pairs, {self.T} tokens per sequence"
    )
    state, ev = self.evaluate(state, step)
    log(f"held-out pair accuracy at step {step}: {100 * ev['heldout_acc']:.1f}% ({len(self.eval_pairs)} pairs)")
    return state, None

  def step(self, state, step):
    rows = epoch_indices(len(self.train_pairs), self.cfg.train.batch_size, step, self.cfg.train.seed)
    state, metrics = self.step_fn(state, jax.device_put({k: v[rows] for k, v in self.train_data.items()}, self.b_sh))
    m = jax.device_get(metrics)
    return state, {
      "finite": bool(m["finite"]),
      "loss": float(m["loss"]),
      "accuracy": float(m["accuracy"]),
      "margin": float(m["margin"]),
      "grad_norm": float(m["grad_norm"]),
      "lr": float(self.schedule(step)),
    }

  def eval_due(self, step):
    return bool(self.cfg.train.eval_every and step % self.cfg.train.eval_every == 0 or step == self.cfg.train.steps)

  def evaluate(self, state, step):
    """Held-out pair accuracy; re-sets b so the held-out scores average 0 (see the module docstring)."""
    n, B = len(self.eval_pairs), self.cfg.train.batch_size
    rows = np.resize(np.arange(n), -(-n // B) * B)  # padded to whole batches, then dropped
    r = np.concatenate(
      [
        np.asarray(
          self.score_fn(
            state.params, jax.device_put({k: v[rows[i : i + B]] for k, v in self.eval_data.items()}, self.b_sh)
          )
        )
        for i in range(0, len(rows), B)
      ]
    )[:n]
    head = state.params["head"]
    b = jax.device_put(head["b"] - jnp.float32(r.mean()), self.shardings.params["head"]["b"])
    params = {"backbone": state.params["backbone"], "head": {"w": head["w"], "b": b}}
    self.evals.append((step, float(np.mean(r[:, 0] > r[:, 1]))))
    return state._replace(params=params), {"heldout_acc": self.evals[-1][1]}

  def checkpoint(self, state, step):
    return state, {
      "kind": KIND,
      "heldout_acc": self.evals[-1][1],
      "heldout_pairs": len(self.eval_pairs),
      "reward": dataclasses.asdict(self.cfg.reward),
    }

  def postfix(self, r):
    return {"loss": f"{r['loss']:.3f}", "acc": f"{100 * self.evals[-1][1]:.0f}%"}

  def log_line(self, step, r):
    return (
      f"step {step:>6}  loss {r['loss']:.4f}  train pair acc {100 * r['accuracy']:.0f}%  "
      f"grad_norm {r['grad_norm']:.3f}"
      + (f"  held-out pair acc {100 * r['heldout_acc']:.1f}%" if "heldout_acc" in r else "")
    )


def train_reward_model(cfg: Config, progress: bool = True, log=print, stop_after: int | None = None) -> dict:
  """Train (or resume) a reward model (cfg.reward) to train.steps; a checkpoint under
  train.out_dir/checkpoints. `stop_after` ends this process after that many steps (emulates a kill).
  Returns a summary dict."""
  task = RewardTraining(cfg, log)
  t0 = time.perf_counter()
  res = run(task, progress=progress, log=log, stop_after=stop_after)
  return {
    "steps": res.step,
    "history": res.history,
    "evals": task.evals,
    "first_acc": task.evals[0][1],
    "last_acc": task.evals[-1][1],
    "train_pairs": len(task.train_pairs),
    "heldout_pairs": len(task.eval_pairs),
    "seconds": time.perf_counter() - t0,
    "checkpoint_dir": res.checkpoint_dir,
  }


# ---- scoring with a trained reward model (the reward "rm:DIR") ----


@functools.partial(jax.jit, static_argnames=("mdef",))
def _scores(mdef, params, tokens, lengths):
  return last_token_scores(mdef, params, tokens, lengths)[0]


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


class RewardModel:
  """A trained reward model on one device. raw_scores(prompts, completions) -> r [B];
  calling it (the batched Reward interface) -> sigmoid(r) [B] in (0, 1)."""

  def __init__(self, config: Config, params: dict, tokenizer, seq_len: int, rows: int = 32):
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.mdef = model_def(config.model)
    self.seq_len, self.rows = int(seq_len), int(rows)

  @classmethod
  def load(cls, directory: str, step: int | None = None) -> RewardModel:
    """From a `train.py reward` checkpoints directory (default: its newest step), on the first device."""
    meta = read_meta(directory, step)
    data = meta.get("data") or {}
    if data.get("kind") != KIND:
      raise CheckpointError(
        f"{directory} (step {meta['step']}) is not a reward-model checkpoint (a language "
        "model's?); train one with `python train.py reward --data PAIRS.jsonl` and pass "
        "its train.out_dir/checkpoints"
      )
    config = read_config(directory, meta["step"])
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract_rm_params(model_def(config.model))
    )
    try:
      out = manager(directory, async_save=False).restore(
        meta["step"], args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
      )
    except Exception as e:  # orbax raises many types; say which checkpoint
      raise CheckpointError(
        f"reward-model parameters of step {meta['step']} in {directory} could not be read "
        f"({type(e).__name__}: {e}); nothing was changed on disk"
      ) from e
    return cls(config, out.params, load_tokenizer(config.train.tokenizer), config.train.seq_len)

  def raw_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """r [B] float32 of prompt + completion pairs (sequences beyond seq_len lose their start)."""
    if len(prompts) != len(completions):
      raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    seqs = [encode(self.tokenizer, p, c)[-self.seq_len :] for p, c in zip(prompts, completions)]
    for i, ids in enumerate(seqs):
      if not ids:
        raise ValueError(f"sample {i}: prompt and completion are both empty; nothing to score")
    out = np.zeros(len(seqs), np.float32)
    for lo in range(0, len(seqs), self.rows):
      chunk = seqs[lo : lo + self.rows]
      T = pow2_bucket(max(map(len, chunk)), 16)  # few shapes: a compile per (rows, T) bucket
      tokens = np.full((self.rows, T), pad_id(self.tokenizer), np.int32)
      lengths = np.ones(self.rows, np.int32)
      for i, ids in enumerate(chunk):
        tokens[i, : len(ids)], lengths[i] = ids, len(ids)
      out[lo : lo + len(chunk)] = np.asarray(_scores(self.mdef, self.params, tokens, lengths))[: len(chunk)]
    return out

  def __call__(self, prompts: Sequence[str], completions: Sequence[str], references=None) -> np.ndarray:
    return sigmoid(self.raw_scores(prompts, completions)).astype(np.float32)
