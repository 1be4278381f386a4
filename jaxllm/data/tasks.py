"""Verifiable tasks that ship with the project: generated problems whose answers a program can check,
for supervised fine-tuning (plain text through `python train.py train.data=FILE`) and for RL with
verifiable rewards (jaxllm.rl.rewards scores completions against `answer(p)`).

The text format is one problem per line, the end of line being the answer's end marker:

  question(p) = "12+345="     answer(p) = "357"     SFT line = question + answer + "\n"
  prompt(p)   = "\n12+345="   (what the model is fed: the problem as it appears in the SFT text,
                               right after the previous line's newline)

so a model's completion of a prompt is read up to its first newline (`extract_answer`). The leading
newline of the prompt matters: in the SFT text every problem follows a newline, never the start of
the sequence, and a byte-level model trained on that text does far worse on a bare "12+345=" at
position 0 (docs/rl.md).

Every task has a fixed held-out split, disjoint from the training problems: which split a problem
belongs to is a hash of the problem itself, independent of any seed or digit range, so the same
problem is held out in every run and no training draw can ever produce it.

Preference pairs (for reward models, jaxllm.rl.reward_model): `preference_pairs(n, split, seed)` turns
problems into (prompt, chosen, rejected) triples, chosen = the correct answer line "357\n" and
rejected = a plausible wrong one (a dropped carry or a digit off by one; or, easier to spot, a digit
dropped or doubled), all of the same split;
`write_preference_file` writes them as jsonl lines {"prompt", "chosen", "rejected"}.

Adding a task: a class with the same methods as AdditionTask (problems, question, prompt, answer,
sft_text, write_sft_file, extract_answer), registered in TASKS under a name. Pure Python + numpy.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import NamedTuple

import numpy as np

SPLITS = ("train", "heldout")
_DIGITS = re.compile(r"[0-9]+")


def answer_line(completion: str) -> str | None:
  """The completion's text before its first newline, stripped; None when there is no newline (the
  generation stopped before the end marker, so it gave no finished answer)."""
  head, newline, _ = completion.partition("\n")
  return head.strip() if newline else None


def extract_answer(completion: str) -> str | None:
  """The numeric answer of a completion: the text up to its first newline, stripped, if that is a
  non-empty run of ASCII digits; else None ("357\\n12+1=" -> "357", " 42 \\n" -> "42", "357" -> None,
  "3 5\\n" -> None, "\\n" -> None)."""
  line = answer_line(completion)
  return line if line is not None and _DIGITS.fullmatch(line) else None


def _split_of(key: str, heldout_fraction: float) -> str:
  """ "heldout" for a fixed ~heldout_fraction of keys, decided by a stable hash (not Python's
  hash(), which is salted per process for strings)."""
  h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
  return "heldout" if h / 2**64 < heldout_fraction else "train"


class Addition(NamedTuple):
  """One problem: a + b."""

  a: int
  b: int


class PreferencePair(NamedTuple):
  """One preference: for `prompt`, the completion `chosen` is better than `rejected`."""

  prompt: str
  chosen: str
  rejected: str


class AdditionTask:
  """Multi-digit addition of non-negative integers: "a+b=" -> "a+b's decimal value".

  Each operand independently gets a digit count uniform in [digits_min, digits_max], then a value
  uniform among the numbers with that many digits (1 digit: 0..9, 2 digits: 10..99, ...), so
  short and long operands are equally common. The held-out split is decided by the unordered pair
  {a, b}: "a+b" and "b+a" are always in the same split, so commutativity cannot leak a held-out
  problem into training.

  The default 1..2 digits is sized for the `tiny` byte-level model (0.9M params, 128-token
  sequences, default optimizer): SFT gets part of the way and leaves room for RL (held-out
  accuracies in docs/rl.md)."""

  name = "addition"
  _ROUND = 4096  # pairs drawn per rejection-sampling round

  def __init__(self, digits_min: int = 1, digits_max: int = 2, seed: int = 0, heldout_fraction: float = 0.1):
    if not 1 <= digits_min <= digits_max <= 18:  # 18: operands stay within int64 while drawn
      raise ValueError(f"digits_min={digits_min}, digits_max={digits_max}: need 1 <= digits_min <= digits_max <= 18")
    if not 0 < heldout_fraction < 1:
      raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
    self.digits_min, self.digits_max = int(digits_min), int(digits_max)
    self.seed, self.heldout_fraction = int(seed), float(heldout_fraction)

  def __repr__(self) -> str:
    return (
      f"AdditionTask(digits_min={self.digits_min}, digits_max={self.digits_max}, seed={self.seed}, "
      f"heldout_fraction={self.heldout_fraction})"
    )

  def split_of(self, p: Addition) -> str:
    """ "train" or "heldout"; depends on the problem only (not on seeds or the digit range)."""
    lo, hi = sorted((int(p.a), int(p.b)))
    return _split_of(f"add:{lo}+{hi}", self.heldout_fraction)

  def _operands(self, rng: np.random.Generator, n: int) -> np.ndarray:
    digits = rng.integers(self.digits_min, self.digits_max + 1, size=n)
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    return rng.integers(low, 10**digits)  # high exclusive: values with exactly `digits` digits

  def problems(self, n: int, split: str = "train", seed: int | None = None) -> list[Addition]:
    """n problems of `split`, the same list for the same (task, n, split, seed); seed None = the
    task's seed. Draws may repeat (the space of 1-digit pairs is small). Held-out problems are
    rejection-sampled from the same distribution, so both splits share it."""
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; use one of {SPLITS}")
    if n < 0:
      raise ValueError(f"n={n} must be >= 0")
    seed = self.seed if seed is None else int(seed)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out: list[Addition] = []
    drawn = 0
    while len(out) < n:
      # Fixed-size rounds, so problems(n) is a prefix of problems(m) for n < m.
      a, b = self._operands(rng, self._ROUND), self._operands(rng, self._ROUND)
      out += [p for p in map(Addition, a.tolist(), b.tolist()) if self.split_of(p) == split]
      drawn += self._ROUND
      if not out and drawn >= 100_000:
        raise ValueError(
          f"{self!r} has no {split!r} problems among {drawn} draws (its digit range is "
          "too small to hold both splits); widen the digit range"
        )
    return out[:n]

  def question(self, p: Addition) -> str:
    """The problem as written in an SFT line: "12+345="."""
    return f"{p.a}+{p.b}="

  def prompt(self, p: Addition) -> str:
    """The model's input: the question after the newline that precedes it in the SFT text."""
    return "\n" + self.question(p)

  def answer(self, p: Addition) -> str:
    return str(p.a + p.b)

  def sft_text(self, n: int, seed: int | None = None) -> str:
    """n training-split problems as SFT lines "a+b=c\\n" (question + answer + end marker)."""
    return "".join(f"{self.question(p)}{self.answer(p)}\n" for p in self.problems(n, "train", seed))

  def write_sft_file(self, path: str, n: int, seed: int | None = None) -> str:
    """Write sft_text(n, seed) to `path` (UTF-8, a .txt for train.data=PATH); returns path."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
      f.write(self.sft_text(n, seed))
    return path

  MISTAKES = ("carry", "digit", "typo")

  def wrong_answer(self, p: Addition, rng: np.random.Generator, mistakes=("carry", "digit")) -> str:
    """A plausible wrong answer to p (never the right one; no leading zeros), one of `mistakes`
    picked uniformly:
      carry  the carry out of one column forgotten (57+68=125 -> 115 or 25); a sum without carries
             gets a digit mistake instead
      digit  one digit of the sum off by one (125 -> 135, 124)
      typo   one digit of the sum dropped or doubled (125 -> 15, 1225): a slip in writing the
             answer down, which changes its length and is far easier to spot than the other two"""
    unknown = set(mistakes) - set(self.MISTAKES) if mistakes else {"(none given)"}
    if unknown:
      raise ValueError(f"mistakes={tuple(mistakes)!r}: unknown {sorted(unknown)}; choose from {self.MISTAKES}")
    total, digits = p.a + p.b, str(p.a + p.b)
    kind = mistakes[int(rng.integers(len(mistakes)))]
    if kind == "carry":
      carries, carry, column, a, b = [], 0, 0, p.a, p.b
      while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        if carry:
          carries.append(column)
        a, b, column = a // 10, b // 10, column + 1
      if carries:
        return str(total - 10 ** (int(rng.choice(carries)) + 1))
    i = int(rng.integers(len(digits)))
    if kind == "typo" and total:
      if len(digits) > 1 and rng.random() < 0.5:
        return str(int(digits[:i] + digits[i + 1 :]))  # dropped ("105" -> "05" reads 5)
      return digits[:i] + digits[i] + digits[i:]  # doubled
    d = int(digits[i])
    options = [x for x in (d - 1, d + 1) if 0 <= x <= 9 and not (i == 0 and x == 0 and len(digits) > 1)]
    return digits[:i] + str(int(rng.choice(options))) + digits[i + 1 :]

  def preference_pairs(
    self, n: int, split: str = "train", seed: int | None = None, mistakes=("carry", "digit")
  ) -> list[PreferencePair]:
    """n pairs over problems(n, split, seed): prompt(p), chosen = answer + "\\n", rejected =
    wrong_answer(mistakes) + "\\n" (the same end marker, so only the number differs). Deterministic,
    and preference_pairs(n) is a prefix of preference_pairs(m) for n < m."""
    seed = self.seed if seed is None else int(seed)
    problems = self.problems(n, split, seed)  # validates n and split
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])  # a stream of its own, not problems()'
    return [
      PreferencePair(self.prompt(p), self.answer(p) + "\n", self.wrong_answer(p, rng, mistakes) + "\n")
      for p in problems
    ]

  def write_preference_file(
    self, path: str, n: int, split: str = "train", seed: int | None = None, mistakes=("carry", "digit")
  ) -> str:
    """Write preference_pairs(n, split, seed, mistakes) as jsonl, one {"prompt", "chosen", "rejected"}
    object a line (for `train.py reward --data PATH`); returns path."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
      for pair in self.preference_pairs(n, split, seed, mistakes):
        f.write(json.dumps(pair._asdict()) + "\n")
    return path

  def rows(self, n: int, split: str = "train", seed: int | None = None) -> list[dict]:
    """n problems of `split` as RL rows {"prompt", "answer"} (jaxllm.rl.data)."""
    return [{"prompt": self.prompt(p), "answer": self.answer(p)} for p in self.problems(n, split, seed)]

  def write_rows(self, path: str, n: int, split: str = "train", seed: int | None = None) -> str:
    """Write rows(n, split, seed) as jsonl (for rl.data=PATH / rl.eval_data=PATH); returns path."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
      for row in self.rows(n, split, seed):
        f.write(json.dumps(row) + "\n")
    return path

  @staticmethod
  def extract_answer(completion: str) -> str | None:
    return extract_answer(completion)


# name -> task class; a task built by name takes the class's keyword arguments.
TASKS = {"addition": AdditionTask}


def make_task(name: str, **kwargs):
  """A task by registry name, e.g. make_task("addition", digits_max=2)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
  return TASKS[name](**kwargs)


def main(argv=None) -> int:
  """`python -m jaxllm.data.tasks addition OUT_DIR`: a task's data files for the post-training path:
  sft.txt (train.data), train.jsonl and eval.jsonl (rl.data, rl.eval_data: rows {"prompt", "answer"}
  of disjoint splits) and pairs.jsonl (train.py reward --data)."""
  import argparse
  import os

  p = argparse.ArgumentParser(prog="python -m jaxllm.data.tasks", description=" ".join(main.__doc__.split()))
  p.add_argument("task", choices=sorted(TASKS))
  p.add_argument("out_dir")
  p.add_argument("--digits-min", type=int, default=1)
  p.add_argument("--digits-max", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sft", type=int, default=200_000, help="SFT lines (sft.txt)")
  p.add_argument("--train", type=int, default=20_000, help="RL training rows (train.jsonl)")
  p.add_argument("--eval", type=int, default=500, help="held-out RL rows (eval.jsonl)")
  p.add_argument("--pairs", type=int, default=4000, help="preference pairs (pairs.jsonl)")
  args = p.parse_args(argv)
  try:
    task = make_task(args.task, digits_min=args.digits_min, digits_max=args.digits_max, seed=args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    files = [
      task.write_sft_file(out("sft.txt"), args.sft),
      task.write_rows(out("train.jsonl"), args.train, "train", seed=args.seed + 1),
      task.write_rows(out("eval.jsonl"), args.eval, "heldout"),
      task.write_preference_file(out("pairs.jsonl"), args.pairs),
    ]
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=__import__("sys").stderr)
    return 2
  print("\n".join(files))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
