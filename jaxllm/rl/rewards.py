"""Verifiable rewards for RL, and their weighted combination.

Rewards see text only: the RL loop detokenizes each sample and passes strings (the prompt, the
generated completion without the prompt, and the task's reference answer); no token ids, logits or
arrays reach a reward. A completion is read up to its first newline, the answer's end marker of the
tasks in jaxllm.data.tasks ("12+345=" -> "357\\n").

A reward is configured as a string of name:weight pairs,

  "exact_match:1.0,format:0.1"
  "exact_match,python:mypkg.rewards:brevity:-0.01"      (a missing weight is 1.0)

parsed by RewardSpec.parse, and scored over a batch by combine(spec, prompts, completions,
references) -> (total [B] float32 = sum of weight * score, {name: unweighted score [B] float32}).

Registry. REWARDS maps a name to a factory returning a Reward:
  exact_match      1.0 if the completion's first line (stripped) equals the reference, else 0.0;
                   no newline (the generation never finished its answer) scores 0.0
  format           1.0 if the completion starts with digits immediately followed by a newline, else
                   0.0 (what follows the newline is not looked at)
  digits           partial credit: the fraction of digit positions (aligned from the right) that
                   agree with the reference, over the longer of the two; 0.0 without a newline
  python:          a prefix form: "python:MODULE:FUNCTION" imports FUNCTION from MODULE, a callable
                   fn(prompt: str, completion: str, reference: str) -> float
  rm:              a prefix form: "rm:DIR" scores with the reward model trained by `train.py reward`
                   (DIR: its train.out_dir/checkpoints), sigmoid of its score in (0, 1), batched
                   (jaxllm.rl.reward_model; jax is imported when such a reward is first made)
A key ending in ":" is such a prefix form: its factory is called with the text after the prefix.

Batch rewards. A Reward is per-sample (fn(prompt, completion, reference) -> float, called once per
sample) or batched (batched=True: fn(prompts, completions, references) -> B floats, called once per
batch), for scorers that want the whole batch at once, such as a learned reward model running one
forward pass. To add one:

  register_reward("reward_model", lambda: Reward("reward_model", rm.score_batch, batched=True))
  register_reward("my_rm:", lambda path: Reward(f"my_rm:{path}", load(path), batched=True))  # "my_rm:DIR:0.5"

A python: callable is treated as batched when it carries `batched_reward = True` (decorate it with
@batched). Scores must be finite numbers; a non-finite or non-numeric one is an error naming the
reward and the sample.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Callable, Sequence

import numpy as np

from jaxllm.data.tasks import answer_line

PYTHON_PREFIX = "python:"
# The answer format of the shipped tasks: digits, then the newline end marker, at the very start.
ANSWER_FORMAT = re.compile(r"[0-9]+\n")


@dataclasses.dataclass(frozen=True)
class Reward:
  """A named scorer. batched=False: fn(prompt, completion, reference) -> float per sample;
  batched=True: fn(prompts, completions, references) -> sequence of B floats for the whole batch."""

  name: str
  fn: Callable
  batched: bool = False

  def __call__(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Scores [B] float32 of one batch (unweighted)."""
    B = len(prompts)
    if len(completions) != B or len(references) != B:
      raise ValueError(
        f"reward {self.name!r}: {B} prompts, {len(completions)} completions, "
        f"{len(references)} references; give one completion and one reference per prompt"
      )
    if self.batched:
      raw = self.fn(list(prompts), list(completions), list(references))
      try:
        scores = np.asarray(raw, dtype=np.float64)
      except (TypeError, ValueError) as e:
        raise ValueError(
          f"reward {self.name!r} (batched) returned {type(raw).__name__}, not a sequence of {B} numbers: {e}"
        ) from None
      if scores.shape != (B,):
        raise ValueError(
          f"reward {self.name!r} (batched) returned shape {scores.shape} for a batch "
          f"of {B}; it must return one score per sample"
        )
    else:
      scores = np.empty(B, np.float64)
      for i, (p, c, r) in enumerate(zip(prompts, completions, references)):
        try:
          value = self.fn(p, c, r)
        except Exception as e:
          e.add_note(f"in reward {self.name!r}, sample {i}")
          raise
        if isinstance(value, (bool, np.bool_)):
          value = float(value)
        if not isinstance(value, (int, float, np.integer, np.floating)):
          raise ValueError(
            f"reward {self.name!r} returned {type(value).__name__} ({value!r:.60}) for "
            f"sample {i}; a reward returns a float"
          )
        scores[i] = value
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
      raise ValueError(
        f"reward {self.name!r} returned a non-finite score ({scores[bad[0]]}) for sample "
        f"{int(bad[0])}; rewards must be finite"
      )
    return scores.astype(np.float32)


def batched(fn: Callable) -> Callable:
  """Mark a python: reward callable as batched: fn(prompts, completions, references) -> B floats."""
  fn.batched_reward = True
  return fn


# ---- the built-in rewards ----


def exact_match(prompt: str, completion: str, reference: str) -> float:
  """1.0 if the completion's first line, stripped, equals the reference (stripped), else 0.0. A
  completion without a newline has not finished its answer: 0.0."""
  line = answer_line(completion)
  return float(line is not None and line == reference.strip())


def format_ok(prompt: str, completion: str, reference: str) -> float:
  """1.0 if the completion starts with one or more digits immediately followed by a newline."""
  return float(ANSWER_FORMAT.match(completion) is not None)


def digit_match(prompt: str, completion: str, reference: str) -> float:
  """Partial credit: the fraction of digit positions, aligned from the right (units with units), at
  which the completion's first line agrees with the reference, over the longer of the two; 1.0 only
  for an exact match, 0.0 without a newline. A denser signal than exact_match for GRPO: a group in
  which every sample has the wrong sum still ranks them by how many digits are right."""
  line = answer_line(completion)
  ref = reference.strip()
  if line is None or not line or not ref:
    return 0.0
  n = max(len(line), len(ref))
  a, b = line.rjust(n), ref.rjust(n)
  return sum(x == y for x, y in zip(a, b)) / n


def load_python_reward(path: str) -> Reward:
  """Reward "python:PATH" for PATH = "MODULE:ATTR" (ATTR may be dotted, e.g. "mod:Class.method") or
  "MODULE.ATTR": the callable found there, per-sample unless it carries batched_reward = True."""
  full = PYTHON_PREFIX + path
  module_name, sep, attr = path.partition(":")
  if not sep:
    module_name, _, attr = path.rpartition(".")
  if not module_name or not attr:
    raise ValueError(f"reward {full!r}: write python:MODULE:FUNCTION, e.g. python:mypkg.rewards:my_reward")
  try:
    obj = importlib.import_module(module_name)
  except Exception as e:  # ImportError, or anything the module raises while it is imported
    raise ValueError(
      f"reward {full!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
      "is it installed, or its directory on sys.path / PYTHONPATH?"
    ) from e
  for part in attr.split("."):
    try:
      obj = getattr(obj, part)
    except AttributeError:
      raise ValueError(f"reward {full!r}: module {module_name!r} has no attribute {attr!r}") from None
  if not callable(obj):
    raise ValueError(
      f"reward {full!r}: {module_name}:{attr} is a {type(obj).__name__}, not callable; it "
      "must be a function fn(prompt, completion, reference) -> float"
    )
  return Reward(full, obj, batched=bool(getattr(obj, "batched_reward", False)))


# name -> factory() -> Reward; a name ending in ":" is a prefix form whose factory takes the text after it.
REWARDS: dict[str, Callable[..., Reward]] = {
  "exact_match": lambda: Reward("exact_match", exact_match),
  "format": lambda: Reward("format", format_ok),
  "digits": lambda: Reward("digits", digit_match),
  PYTHON_PREFIX: load_python_reward,
}


RM_PREFIX = "rm:"


def load_rm_reward(path: str) -> Reward:
  """Reward "rm:DIR": the reward model in the checkpoints directory DIR (jaxllm.rl.reward_model,
  imported here so that this module stays free of jax until a reward model is asked for)."""
  from jaxllm.io.checkpoint import CheckpointError
  from jaxllm.rl.reward_model import RewardModel

  try:
    model = RewardModel.load(path)
  except (CheckpointError, ValueError) as e:
    raise ValueError(f"reward 'rm:{path}': {e}") from e
  return Reward(f"rm:{path}", model, batched=True)


def register_reward(name: str, factory: Callable[..., Reward], *, replace: bool = False) -> None:
  """Add a reward to REWARDS. `factory()` returns the Reward (for a name ending in ":",
  `factory(arg)` with the text after the prefix). Batch scorers return Reward(..., batched=True)."""
  if not name or "," in name:
    raise ValueError(f"reward name {name!r} must be non-empty and contain no ','")
  if name in REWARDS and not replace:
    raise ValueError(f"reward {name!r} is already registered; pass replace=True to override it")
  REWARDS[name] = factory


register_reward(RM_PREFIX, load_rm_reward)


def known_rewards() -> str:
  plain = sorted(k for k in REWARDS if not k.endswith(":"))
  prefixes = sorted(k for k in REWARDS if k.endswith(":"))
  forms = [f"{p}MODULE:FUNCTION" if p == PYTHON_PREFIX else f"{p}ARG" for p in prefixes]
  return ", ".join(plain + forms)


def make_reward(name: str) -> Reward:
  """The Reward of one registry name ("exact_match") or prefix form ("python:mod:fn")."""
  for prefix in REWARDS:
    if prefix.endswith(":") and name.startswith(prefix):
      return REWARDS[prefix](name[len(prefix) :])
  if name in REWARDS:
    return REWARDS[name]()
  raise ValueError(
    f"unknown reward {name!r}; known rewards: {known_rewards()} "
    '(e.g. "exact_match:1.0,format:0.1" or "python:mypkg.rewards:my_reward:0.5")'
  )


def _is_prefix_form(name: str) -> bool:
  return any(k.endswith(":") and name.startswith(k) for k in REWARDS)


def _parse_item(item: str) -> tuple[str, float]:
  """ "name:weight" -> (name, weight); "name" -> (name, 1.0). The weight is the text after the last
  ':' when it is a number, so prefix forms with colons ("python:mod:fn:0.5") parse too."""
  head, sep, tail = item.rpartition(":")
  head, tail = head.strip(), tail.strip()
  if sep:
    try:
      weight = float(tail)
    except ValueError:
      weight = None
    if weight is not None:
      if not math.isfinite(weight):
        raise ValueError(f"reward {head!r}: weight {tail!r} must be a finite number")
      return head, weight
    if head in REWARDS and not head.endswith(":"):
      raise ValueError(f"reward {head!r}: weight {tail!r} is not a number; write {head}:WEIGHT, e.g. {head}:1.0")
  return item, 1.0


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """Weighted rewards: ((Reward, weight), ...), in the order the config string gave them."""

  terms: tuple[tuple[Reward, float], ...]

  @classmethod
  def parse(cls, text: str) -> RewardSpec:
    """From "name:weight,name:weight,..." (a missing weight is 1.0). Unknown names, bad weights,
    duplicates and python: paths that do not import are ValueErrors naming the entry."""
    if not isinstance(text, str):
      raise ValueError(f'reward spec must be a string like "exact_match:1.0,format:0.1", got {type(text).__name__}')
    terms, seen = [], set()
    for item in (s.strip() for s in text.split(",")):
      if not item:
        continue  # tolerate "a:1,,b:2" and a trailing comma
      name, weight = _parse_item(item)
      if name in seen:
        raise ValueError(f"reward {name!r} appears twice in {text!r}; give each reward once")
      if name not in REWARDS and not _is_prefix_form(name):
        raise ValueError(
          f"unknown reward {name!r} in {text!r}; known rewards: {known_rewards()} "
          '(e.g. "exact_match:1.0,format:0.1" or "python:mypkg.rewards:my_reward:0.5")'
        )
      seen.add(name)
      terms.append((make_reward(name), weight))
    if not terms:
      raise ValueError(
        f'reward spec {text!r} names no reward; e.g. "exact_match:1.0,format:0.1" (known rewards: {known_rewards()})'
      )
    return cls(tuple(terms))

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(r.name for r, _ in self.terms)

  @property
  def weights(self) -> dict[str, float]:
    return {r.name: w for r, w in self.terms}

  def __str__(self) -> str:
    return ",".join(f"{r.name}:{w:g}" for r, w in self.terms)


def combine(
  spec: RewardSpec | str, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """-> (total [B] float32 = sum over terms of weight * score, {name: unweighted score [B] float32}).
  `spec` may be a config string, parsed here."""
  if isinstance(spec, str):
    spec = RewardSpec.parse(spec)
  B = len(prompts)
  if len(completions) != B or len(references) != B:
    raise ValueError(
      f"combine: {B} prompts, {len(completions)} completions, {len(references)} references; "
      "give one completion and one reference per prompt"
    )
  total = np.zeros(B, np.float64)
  per_reward = {}
  for reward, weight in spec.terms:
    scores = reward(prompts, completions, references)
    per_reward[reward.name] = scores
    total += weight * scores.astype(np.float64)
  return total.astype(np.float32), per_reward
