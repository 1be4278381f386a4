"""Verifiable rewards for RL, and their weighted combination.

Rewards see text and the dataset row, nothing else: the RL loop detokenizes each sample and passes
strings (the prompt and the generated completion without the prompt) together with the sample's
dataset row, a dict holding the prompt (or messages) and every other field of that row ("answer",
"tests", metadata); no token ids, logits or arrays reach a reward. The built-in rewards compare with
the row's "answer" field; the arithmetic ones (exact_match, format, digits) read a completion up to
its first newline, the answer's end marker of the tasks in jaxllm.data.tasks ("12+345=" -> "357\\n").

A reward is configured as a string of name:weight pairs,

  "exact_match:1.0,format:0.1"
  "exact_match,python:mypkg.rewards:brevity:-0.01"      (a missing weight is 1.0)

parsed by RewardSpec.parse, and scored over a batch by combine(spec, prompts, completions, rows) ->
(total [B] float32 = sum of weight * score, {name: unweighted score [B] float32}). An element of
`rows` that is a str (or None) stands for the row {"answer": that}, as older callers passed the
reference answers alone.

Registry. REWARDS maps a name to a factory returning a Reward:
  exact_match      1.0 if the completion's first line (stripped) equals the answer, else 0.0; no
                   newline (the generation never finished its answer) scores 0.0
  format           1.0 if the completion starts with digits immediately followed by a newline, else
                   0.0 (what follows the newline is not looked at)
  digits           partial credit: the fraction of digit positions (aligned from the right) that
                   agree with the answer, over the longer of the two; 0.0 without a newline
  math             1.0 if the completion's final answer equals the answer by value, else 0.0 (see
                   "The math reward" below)
  python:          a prefix form: "python:MODULE:FUNCTION" imports FUNCTION from MODULE (calling
                   convention below)
  rm:              a prefix form: "rm:DIR" scores with the reward model trained by `train.py reward`
                   (DIR: its train.out_dir/checkpoints), sigmoid of its score in (0, 1), batched, on
                   the prompt and completion texts (jaxllm.rl.reward_model; jax is imported when such
                   a reward is first made)
A key ending in ":" is such a prefix form: its factory is called with the text after the prefix.
exact_match, digits and math need the row's "answer" field (a row without it is an error naming the
reward and the row); a number there is read as its text.

Calling convention (TRL's, for python: rewards and any Reward made without an explicit form). A
Reward is per-sample (called once per sample) or batched (batched=True, or a python: callable
carrying `batched_reward = True`, i.e. decorated with @batched: called once per batch, returning B
floats), for scorers that want the whole batch at once, such as a learned reward model running one
forward pass. How the row reaches fn is read from fn's signature (inspect.signature):
  fn(prompt, completion, **fields)        fn takes **kwargs: every field of the row as a keyword
                                          argument (batched: fn(prompts, completions, **columns),
                                          each field as a list of B values, None where a row lacks
                                          it), except "prompt"/"completion" (and the names of fn's
                                          own first two parameters), which the texts stand for
  fn(prompt, completion, *, tests)        two positional parameters and keyword-only ones: only the
                                          row fields named so, as keywords (a required one that the
                                          row lacks is an error naming the row)
  fn(prompt, completion, reference)       a third positional parameter (or *args) and no **kwargs:
                                          the older form, reference = row.get("answer") (batched:
                                          the list of them), None where the row has no answer
Reward(..., form=...) pins the form instead: "fields", "reference", or "answer" (the reference form
that requires the answer, used by the built-ins). To add a reward:

  register_reward("reward_model", lambda: Reward("reward_model", rm.score_batch, batched=True))
  register_reward("my_rm:", lambda path: Reward(f"my_rm:{path}", load(path), batched=True))  # "my_rm:DIR:0.5"

Scores must be finite numbers; a non-finite or non-numeric one is an error naming the reward and the
sample. A reward that raises becomes a ValueError naming the reward and the row (its index in the
batch and the start of its repr), so a run stops with one line saying which row broke which reward.

The math reward. The final answer of a completion is the text after its last "####" up to the end
of that line (GSM8K), else the content of its last complete \\boxed{...} (braces nested; a \\boxed{
that never closes is no answer, as the generation was cut off), else the whole text, in which the
verifier finds the final number or expression (the last one, or the one after "the answer is"). The
reference answer is read the same way, so "#### 42" and "\\boxed{42}" are fine as answers. Both are
compared by value with math-verify (Hugging Face's maintained answer verifier: LaTeX and plain
expressions to sympy, then numeric and symbolic equality; floats agree to 6 decimals, so 0.333333 ==
1/3), so 3/4 == 0.75 == \\frac{3}{4} == \\dfrac34, 1,000 == 1000, 2.50 == 2.5, -3 != 3, and "$42",
"\\$42", "42 dollars", "42\\%", "10 \\text{cm}" all read as the number (42% also matches 0.42). LaTeX
in running text is read inside $...$ only. A boxed answer that does not read as a number in LaTeX
("\\boxed{42 dollars}") is read once more as plain text; an answer the verifier cannot read at all
falls back to its last number. The verifier bounds each parse and comparison with a 5 s alarm
(SIGALRM), which only works in the main thread: elsewhere it runs without that bound.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxllm.data.tasks import answer_line

PYTHON_PREFIX = "python:"
# The answer format of the shipped tasks: digits, then the newline end marker, at the very start.
ANSWER_FORMAT = re.compile(r"[0-9]+\n")
# How a Reward's fn takes the row (module doc, "Calling convention").
FORMS = ("fields", "reference", "answer")
# Row fields that the prompt and completion texts stand for, never passed as keywords.
TEXT_FIELDS = frozenset({"prompt", "prompts", "completion", "completions"})
ROW_REPR_CHARS = 80


def as_rows(rows: Sequence[Any]) -> list[Mapping]:
  """The rows of a batch as mappings: a str or None stands for {"answer": it} (callers that pass
  reference answers alone); anything else that is not a mapping is a ValueError naming its index."""
  out = []
  for i, row in enumerate(rows):
    if row is None or isinstance(row, str):
      row = {"answer": row}
    elif not isinstance(row, Mapping):
      raise ValueError(
        f"row {i} of the batch is a {type(row).__name__} ({row!r:.60}); give each sample's dataset row "
        'as a dict (e.g. {"prompt": ..., "answer": ...}) or its answer as a str'
      )
    out.append(row)
  return out


def short_repr(row: Any) -> str:
  """The start of a row's repr, for error messages: at most ROW_REPR_CHARS characters, one line."""
  text = " ".join(repr(dict(row) if isinstance(row, Mapping) else row).split())
  return text if len(text) <= ROW_REPR_CHARS else text[: ROW_REPR_CHARS - 3] + "..."


def _one_line(e: BaseException, limit: int = 200) -> str:
  text = " ".join(f"{type(e).__name__}: {e}".split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def calling_form(fn: Callable) -> tuple[str, frozenset[str] | None, frozenset[str]]:
  """-> (form, keywords, texts) of fn from its signature: form "fields" when fn takes **kwargs
  (keywords None: every field) or at most two positional parameters (keywords: the names of its
  keyword-only parameters); "reference" when it takes a third positional parameter or *args, or has
  no signature to read. `texts`: the names of its first two parameters, never passed as fields."""
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):  # some builtins and C callables
    return "reference", frozenset(), frozenset()
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  texts = frozenset(p.name for p in positional[:2])
  if any(p.kind is p.VAR_KEYWORD for p in params):
    return "fields", None, texts
  if len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params):
    return "reference", frozenset(), texts
  return "fields", frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY), texts


@dataclasses.dataclass(frozen=True)
class Reward:
  """A named scorer of (prompt, completion, row) triples (module doc, "Calling convention").
  batched=False: fn is called once per sample and returns a float; batched=True: once per batch with
  lists, returning B floats. form: how fn takes the row, one of FORMS; None reads it from fn's
  signature (after construction `form` holds the form used)."""

  name: str
  fn: Callable
  batched: bool = False
  form: str | None = None
  keywords: frozenset[str] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
  texts: frozenset[str] = dataclasses.field(default=frozenset(), init=False, repr=False, compare=False)

  def __post_init__(self):
    form, keywords, texts = calling_form(self.fn)
    if self.form is not None:
      if self.form not in FORMS:
        raise ValueError(f"reward {self.name!r}: form {self.form!r} is not one of {', '.join(FORMS)}")
      form = self.form
    object.__setattr__(self, "form", form)
    object.__setattr__(self, "keywords", keywords)
    object.__setattr__(self, "texts", texts)

  def _fields(self, row: Mapping) -> dict:
    """The row's fields that fn takes as keywords."""
    skip = TEXT_FIELDS | self.texts
    return {
      k: v
      for k, v in row.items()
      if isinstance(k, str) and k not in skip and (self.keywords is None or k in self.keywords)
    }

  def _answer(self, row: Mapping, i: int) -> Any:
    """The row's reference answer: row.get("answer") for the reference form; for the answer form its
    text, and a row without one is a ValueError naming this reward and the row."""
    answer = row.get("answer")
    if self.form != "answer":
      return answer
    if answer is None:
      raise ValueError(
        f"reward {self.name!r} compares with the row's 'answer' field, which row {i} of the batch lacks: "
        f'{short_repr(row)}; give each row an "answer" (e.g. {{"prompt": "...", "answer": "42"}})'
      )
    return answer if isinstance(answer, str) else str(answer)

  def _call_batched(self, prompts: list[str], completions: list[str], rows: list[Mapping]) -> Any:
    if self.form == "fields":
      names = list(dict.fromkeys(k for row in rows for k in self._fields(row)))
      columns = {k: [row.get(k) for row in rows] for k in names}
      return self.fn(prompts, completions, **columns)
    return self.fn(prompts, completions, [self._answer(row, i) for i, row in enumerate(rows)])

  def __call__(self, prompts: Sequence[str], completions: Sequence[str], rows: Sequence[Any]) -> np.ndarray:
    """Scores [B] float32 of one batch (unweighted). rows: each sample's dataset row (a dict), or its
    reference answer as a str (module doc)."""
    B = len(prompts)
    if len(completions) != B or len(rows) != B:
      raise ValueError(
        f"reward {self.name!r}: {B} prompts, {len(completions)} completions, {len(rows)} rows; "
        "give one completion and one row per prompt"
      )
    rows = as_rows(rows)
    if self.batched:
      if self.form == "answer":
        for i, row in enumerate(rows):
          self._answer(row, i)  # name the first row without an answer before calling fn
      try:
        raw = self._call_batched(list(prompts), list(completions), rows)
      except Exception as e:
        raise ValueError(
          f"reward {self.name!r} (batched) raised {_one_line(e)} on a batch of {B} rows"
          + (f", the first of which is {short_repr(rows[0])}" if rows else "")
        ) from e
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
      for i, (p, c, row) in enumerate(zip(prompts, completions, rows)):
        if self.form == "fields":
          args, kwargs = (p, c), self._fields(row)
        else:
          args, kwargs = (p, c, self._answer(row, i)), {}
        try:
          value = self.fn(*args, **kwargs)
        except Exception as e:
          raise ValueError(
            f"reward {self.name!r} raised {_one_line(e)} on row {i} of the batch: {short_repr(row)}"
          ) from e
        if isinstance(value, (bool, np.bool_)):
          value = float(value)
        if not isinstance(value, (int, float, np.integer, np.floating)):
          raise ValueError(
            f"reward {self.name!r} returned {type(value).__name__} ({value!r:.60}) for "
            f"sample {i} (row {short_repr(row)}); a reward returns a float"
          )
        scores[i] = value
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
      i = int(bad[0])
      raise ValueError(
        f"reward {self.name!r} returned a non-finite score ({scores[i]}) for sample "
        f"{i} (row {short_repr(rows[i])}); rewards must be finite"
      )
    return scores.astype(np.float32)


def batched(fn: Callable) -> Callable:
  """Mark a python: reward callable as batched: fn(prompts, completions, **columns) -> B floats (or
  the older fn(prompts, completions, references); module doc)."""
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


# ---- the math reward (module doc, "The math reward") ----

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number as written in text: sign, digits with optional thousands separators, decimals, a fraction.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")
_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-"})
MATH_TIMEOUT_S = 5


def _closing_brace(text: str, start: int) -> int | None:
  """The index of the "}" that closes the group opened just before `start`, or None."""
  depth = 1
  for j in range(start, len(text)):
    ch = text[j]
    if ch == "{" and text[j - 1] != "\\":
      depth += 1
    elif ch == "}" and text[j - 1] != "\\":
      depth -= 1
      if depth == 0:
        return j
  return None


def final_answer(text: str) -> tuple[str, str] | None:
  """(kind, answer) of a completion or reference answer: ("####", the rest of the line after the
  last "####"), else ("boxed", the content of the last complete \\boxed{...}), else ("text", the
  whole text). None when there is no answer: nothing after "####", an empty \\boxed{}, a \\boxed{
  that never closes, or blank text."""
  text = text.translate(_UNICODE_MINUS)
  at = text.rfind("####")
  if at >= 0:
    answer = text[at + 4 :].split("\n", 1)[0].strip()
    return ("####", answer) if answer else None
  boxes = list(_BOXED.finditer(text))
  if boxes:
    for m in reversed(boxes):
      end = _closing_brace(text, m.end())
      if end is not None:
        answer = text[m.end() : end].strip()
        return ("boxed", answer) if answer else None
    return None
  return ("text", text) if text.strip() else None


def _math_verify():
  """The math_verify module, imported on first use (it brings sympy and antlr4, about 1 s)."""
  try:
    import math_verify
  except ImportError as e:
    raise ValueError(
      f"reward 'math' needs the math-verify package ({e}); install it with pip install math-verify"
    ) from e
  return math_verify


def _timeout() -> int | None:
  """math_verify's per-call bound: a SIGALRM, which Python allows in the main thread only."""
  return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _is_number(value: Any) -> bool:
  return getattr(value, "is_number", False) is True


def _plain(text: str) -> str:
  """LaTeX dressing off an answer, for reading it as plain text: \\text{..}/\\mathrm{..} unwrapped,
  \\$, \\%, \\, and \\! dropped."""
  text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", text)
  return re.sub(r"\\[$%,!;]", " ", text)


def answer_values(text: str) -> list:
  """What the verifier reads an answer as: a list of sympy values and their strings (empty when there
  is no answer; see final_answer). A boxed answer is read as LaTeX, then, if that gives no number, as
  plain text; an answer the verifier cannot read falls back to its last number."""
  found = final_answer(text)
  if found is None:
    return []
  mv = _math_verify()
  kind, answer = found
  timeout = _timeout()
  values = mv.parse("\\boxed{" + answer + "}" if kind == "boxed" else answer, parsing_timeout=timeout)
  if kind == "boxed" and not any(_is_number(v) for v in values):
    values += mv.parse(_plain(answer), parsing_timeout=timeout)
  if not values:
    numbers = _NUMBER.findall(_plain(answer))
    if numbers:
      values = mv.parse(numbers[-1].replace(",", ""), parsing_timeout=timeout)
  return values


def math_match(prompt: str, completion: str, reference: str) -> float:
  """1.0 if the completion's final answer equals the reference answer by value (module doc, "The
  math reward"), else 0.0; 0.0 when either has no answer."""
  gold = answer_values(reference)
  if not gold:
    return 0.0
  pred = answer_values(completion)
  if not pred:
    return 0.0
  return float(_math_verify().verify(gold, pred, timeout_seconds=_timeout()))


def make_math_reward() -> Reward:
  _math_verify()  # a missing package is an error when the spec is parsed, not mid-run
  return Reward("math", math_match, form="answer")


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
      "must be a function fn(prompt, completion, **fields) -> float"
    )
  return Reward(full, obj, batched=bool(getattr(obj, "batched_reward", False)))


# name -> factory() -> Reward; a name ending in ":" is a prefix form whose factory takes the text after it.
REWARDS: dict[str, Callable[..., Reward]] = {
  "exact_match": lambda: Reward("exact_match", exact_match, form="answer"),
  "format": lambda: Reward("format", format_ok, form="reference"),  # reads the completion only
  "digits": lambda: Reward("digits", digit_match, form="answer"),
  "math": make_math_reward,
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
  # The model reads the texts only: the fields form passes no row field to its (prompts, completions).
  return Reward(f"rm:{path}", model, batched=True, form="fields")


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
  spec: RewardSpec | str, prompts: Sequence[str], completions: Sequence[str], rows: Sequence[Mapping | str | None]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """-> (total [B] float32 = sum over terms of weight * score, {name: unweighted score [B] float32}).
  `spec` may be a config string, parsed here. rows: each sample's dataset row, a dict of its fields
  ("prompt" or "messages", "answer", ...), handed to every reward (module doc, "Calling convention");
  a str or None stands for {"answer": it}."""
  if isinstance(spec, str):
    spec = RewardSpec.parse(spec)
  B = len(prompts)
  if len(completions) != B or len(rows) != B:
    raise ValueError(
      f"combine: {B} prompts, {len(completions)} completions, {len(rows)} rows; "
      "give one completion and one row per prompt"
    )
  rows = as_rows(rows)
  total = np.zeros(B, np.float64)
  per_reward = {}
  for reward, weight in spec.terms:
    scores = reward(prompts, completions, rows)
    per_reward[reward.name] = scores
    total += weight * scores.astype(np.float64)
  return total.astype(np.float32), per_reward
