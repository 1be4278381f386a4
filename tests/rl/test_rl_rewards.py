"""jaxllm.rl.rewards: the built-in rewards on hand-written completions, the reward-spec parser and
its errors, the python: loader, batched rewards, combine()'s arithmetic, and how each sample's
dataset row reaches a reward (TRL's **fields convention, the older reference form, errors naming the
row). The math reward has its own file, test_math_reward.py."""

import sys
import textwrap

import numpy as np
import pytest

from jaxllm.rl import rewards as R
from jaxllm.rl.rewards import REWARDS, Reward, RewardSpec, combine, make_reward, register_reward


def brevity(prompt, completion, reference):
  """A per-sample reward loaded by path, python:test_rl_rewards:brevity (the `here` fixture puts
  this file's directory on sys.path)."""
  return -float(len(completion))


@R.batched
def batch_len(prompts, completions, references):
  return [len(c) for c in completions]


def passes_tests(prompt, completion, **fields):
  """A TRL-style per-sample reward, python:test_rl_rewards:passes_tests: every row field arrives as a
  keyword (the row's "prompt" does not: the prompt text stands for it)."""
  assert "prompt" not in fields and "completion" not in fields
  return float(completion.strip() in fields["tests"]) + (0.5 if completion.strip() == fields.get("answer") else 0.0)


@R.batched
def batch_columns(prompts, completions, **columns):
  """A TRL-style batched reward: each row field as a list over the batch (None where a row lacks it)."""
  assert all(len(v) == len(prompts) for v in columns.values())
  return [float(c.strip() == a) + (w or 0) for c, a, w in zip(completions, columns["answer"], columns["bonus"])]


def old_form(prompt, completion, reference):
  """The older per-sample form: the third positional parameter is the row's answer (None if absent)."""
  return -1.0 if reference is None else float(completion.strip() == reference)


def wants_level(prompt, completion, *, level):
  """Keyword-only parameters: only the fields named so are passed."""
  return float(level)


def crashes_on_b(prompt, completion, **fields):
  if completion == "b":
    raise RuntimeError("cannot\nscore b")
  return 0.0


NOT_CALLABLE = 3


@pytest.fixture
def here(monkeypatch):
  """This module importable as `test_rl_rewards` for python: paths."""
  import os

  monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
  return "test_rl_rewards"


@pytest.mark.parametrize(
  "completion, reference, em, fmt",
  [
    ("357\n", "357", 1.0, 1.0),
    ("357\n12+1=13\n", "357", 1.0, 1.0),  # only the first line is the answer
    ("358\n", "357", 0.0, 1.0),  # well formed, wrong
    ("357", "357", 0.0, 0.0),  # no end marker: unfinished
    (" 357\n", "357", 1.0, 0.0),  # exact_match strips; format wants digits first
    ("357 \n", "357", 1.0, 0.0),
    ("0357\n", "357", 0.0, 1.0),  # string match, not numeric
    ("\n", "357", 0.0, 0.0),
    ("", "357", 0.0, 0.0),
    ("abc\n", "357", 0.0, 0.0),
    ("1000\n", "1000\n", 1.0, 1.0),  # the reference is stripped too
  ],
)
def test_builtin_rewards(completion, reference, em, fmt):
  assert R.exact_match("12+345=", completion, reference) == em
  assert R.format_ok("12+345=", completion, reference) == fmt
  out = make_reward("exact_match")(["p"], [completion], [reference])
  assert out.dtype == np.float32 and out.shape == (1,) and out[0] == em
  assert make_reward("format")(["p"], [completion], [reference])[0] == fmt


@pytest.mark.parametrize(
  "completion, reference, score",
  [
    ("357\n", "357", 1.0),
    ("358\n", "357", 2 / 3),
    ("57\n", "357", 2 / 3),
    ("1357\n", "357", 3 / 4),
    ("999\n", "357", 0.0),
    ("357", "357", 0.0),
    ("\n", "357", 0.0),
    ("x57\n", "357", 2 / 3),
  ],
)
def test_digits_partial_credit(completion, reference, score):
  assert R.digit_match("", completion, reference) == pytest.approx(score)
  assert make_reward("digits")([""], [completion], [reference])[0] == pytest.approx(score)


def test_exact_match_works_for_non_numeric_answers():
  assert R.exact_match("capital of France? ", "Paris\n", "Paris") == 1.0


def test_spec_parsing_weights_and_defaults():
  spec = RewardSpec.parse("exact_match:1.0, format:0.1")
  assert spec.names == ("exact_match", "format") and spec.weights == {"exact_match": 1.0, "format": 0.1}
  assert str(spec) == "exact_match:1,format:0.1" and RewardSpec.parse(str(spec)).weights == spec.weights
  assert RewardSpec.parse("format").weights == {"format": 1.0}  # weight defaults to 1
  assert RewardSpec.parse("format:-0.5,").weights == {"format": -0.5}  # penalties, trailing comma
  assert RewardSpec.parse("exact_match:2e-1").weights == {"exact_match": 0.2}
  assert set(REWARDS) >= {"exact_match", "format", "python:"}


@pytest.mark.parametrize(
  "text, match",
  [
    ("exact_mach:1.0", r"unknown reward 'exact_mach'.*exact_match, format, math, python:MODULE:FUNCTION"),
    ("exact_match:1.0,nope", r"unknown reward 'nope'.*python:MODULE:FUNCTION"),
    ("exact_match:abc", r"'exact_match': weight 'abc' is not a number"),
    ("format:", r"'format': weight '' is not a number"),
    ("format:nan", r"'format': weight 'nan' must be a finite number"),
    ("format:inf", r"finite"),
    ("format:1,format:2", r"'format' appears twice"),
    ("", r"names no reward.*exact_match"),
    (" , ", r"names no reward"),
  ],
)
def test_spec_errors_name_the_problem(text, match):
  with pytest.raises(ValueError, match=match):
    RewardSpec.parse(text)


def test_python_reward_from_this_module(here):
  spec = RewardSpec.parse(f"python:{here}:brevity:0.5,format")
  name = f"python:{here}:brevity"
  assert spec.names == (name, "format") and spec.weights[name] == 0.5
  total, per = combine(spec, ["a", "b"], ["12\n", "x"], ["12", "1"])
  np.testing.assert_allclose(per[name], [-3.0, -1.0])
  np.testing.assert_allclose(per["format"], [1.0, 0.0])
  np.testing.assert_allclose(total, [0.5 * -3 + 1, 0.5 * -1 + 0])
  # MODULE.FUNCTION also works; no weight means 1.0.
  assert RewardSpec.parse(f"python:{here}.brevity").weights == {f"python:{here}.brevity": 1.0}


def test_python_reward_from_a_module_in_tmp_path(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(
    textwrap.dedent("""
    def has_seven(prompt, completion, reference):
      return 1.0 if "7" in completion else 0.0

    class Scorer:
      @staticmethod
      def length(prompt, completion, reference):
        return len(completion)
  """)
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
  total, per = combine(
    "python:my_rewards:has_seven:2,python:my_rewards:Scorer.length:0.25",
    ["p"] * 3,
    ["7\n", "8\n", "77"],
    ["7", "7", "7"],
  )
  np.testing.assert_allclose(per["python:my_rewards:has_seven"], [1, 0, 1])
  np.testing.assert_allclose(per["python:my_rewards:Scorer.length"], [2, 2, 2])
  np.testing.assert_allclose(total, [2.5, 0.5, 2.5])


@pytest.mark.parametrize(
  "path, match",
  [
    ("no_such_module_xyz:fn", r"'python:no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'"),
    ("{here}:missing", r"'python:{here}:missing': module '{here}' has no attribute 'missing'"),
    ("{here}:NOT_CALLABLE", r"'python:{here}:NOT_CALLABLE':.*is a int, not callable"),
    ("fn_without_module", r"write python:MODULE:FUNCTION"),
  ],
)
def test_python_reward_errors_name_the_path(here, path, match):
  with pytest.raises(ValueError, match=match.format(here=here)):
    RewardSpec.parse(f"python:{path.format(here=here)}:1.0")


def test_python_reward_module_that_fails_to_import(tmp_path, monkeypatch):
  (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('boom')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ValueError, match=r"python:broken_rewards:f'.*RuntimeError: boom"):
    RewardSpec.parse("python:broken_rewards:f")


def test_combine_arithmetic():
  prompts = ["1+1=", "2+2=", "3+3=", "4+4="]
  completions = ["2\n", "5\n", "6", " 8\n"]
  references = ["2", "4", "6", "8"]
  total, per = combine("exact_match:1.0,format:0.1", prompts, completions, references)
  assert list(per) == ["exact_match", "format"]
  np.testing.assert_array_equal(per["exact_match"], [1, 0, 0, 1])
  np.testing.assert_array_equal(per["format"], [1, 1, 0, 0])
  assert total.dtype == np.float32 and total.shape == (4,)
  np.testing.assert_allclose(total, [1.1, 0.1, 0.0, 1.0], rtol=1e-6)
  # Weights scale linearly; a parsed spec and its string give the same result.
  total2, _ = combine(RewardSpec.parse("exact_match:-2,format:3"), prompts, completions, references)
  np.testing.assert_allclose(total2, [1.0, 3.0, 0.0, -2.0])
  empty, per_empty = combine("format", [], [], [])
  assert empty.shape == (0,) and per_empty["format"].shape == (0,)
  with pytest.raises(ValueError, match="2 prompts, 1 completions"):
    combine("format", ["a", "b"], ["1\n"], ["1", "2"])


def test_batched_rewards_are_called_once_per_batch(here, monkeypatch):
  calls = []

  def score_batch(prompts, completions, references):
    calls.append(len(prompts))
    return np.arange(len(prompts), dtype=np.float64) / 2

  monkeypatch.setitem(REWARDS, "toy_rm", lambda: Reward("toy_rm", score_batch, batched=True))
  total, per = combine("toy_rm:2,exact_match", ["a", "b", "c"], ["1\n", "2\n", "3\n"], ["1", "0", "3"])
  assert calls == [3]
  np.testing.assert_allclose(per["toy_rm"], [0, 0.5, 1.0])
  np.testing.assert_allclose(total, [1.0, 1.0, 3.0])
  # A python: callable marked @batched is batched too.
  reward = make_reward(f"python:{here}:batch_len")
  assert reward.batched
  np.testing.assert_allclose(reward(["p", "q"], ["12\n", "1"], ["12", "1"]), [3, 1])
  # A batch reward must return one finite score per sample.
  monkeypatch.setitem(REWARDS, "short_rm", lambda: Reward("short_rm", lambda p, c, r: [1.0], batched=True))
  with pytest.raises(ValueError, match=r"'short_rm' \(batched\) returned shape \(1,\) for a batch of 2"):
    combine("short_rm", ["a", "b"], ["1", "2"], ["1", "2"])


def test_register_reward_prefix_forms_and_duplicates(monkeypatch):
  monkeypatch.setattr(R, "REWARDS", dict(REWARDS))  # keep the module registry clean
  register_reward(
    "fake_rm:", lambda path: Reward(f"fake_rm:{path}", lambda ps, cs, rs: [len(path)] * len(ps), batched=True)
  )
  spec = RewardSpec.parse("fake_rm:/ckpt/dir:0.5,exact_match")
  assert spec.weights == {"fake_rm:/ckpt/dir": 0.5, "exact_match": 1.0}
  total, _ = combine(spec, ["p"], ["1\n"], ["1"])
  np.testing.assert_allclose(total, [0.5 * len("/ckpt/dir") + 1])
  with pytest.raises(ValueError, match="already registered"):
    register_reward("format", lambda: Reward("format", R.format_ok))
  with pytest.raises(ValueError, match="no ','"):
    register_reward("a,b", lambda: None)
  assert "fake_rm:ARG" in R.known_rewards()


def test_bad_scores_name_the_reward_and_sample(monkeypatch):
  monkeypatch.setitem(REWARDS, "nan_r", lambda: Reward("nan_r", lambda p, c, r: float("nan") if c == "x" else 0.0))
  with pytest.raises(ValueError, match=r"'nan_r' returned a non-finite score \(nan\) for sample 1"):
    combine("nan_r", ["a", "b"], ["y", "x"], ["", ""])
  monkeypatch.setitem(REWARDS, "none_r", lambda: Reward("none_r", lambda p, c, r: None))
  with pytest.raises(ValueError, match=r"'none_r' returned NoneType .* for sample 0"):
    combine("none_r", ["a"], ["b"], ["c"])

  def crash(p, c, r):
    raise KeyError("oops")

  monkeypatch.setitem(REWARDS, "crash_r", lambda: Reward("crash_r", crash))
  with pytest.raises(ValueError, match=r"reward 'crash_r' raised KeyError: 'oops' on row 0 of the batch") as info:
    combine("crash_r", ["a"], ["b"], ["c"])
  assert isinstance(info.value.__cause__, KeyError)  # the original error stays chained
  # bools count as 0/1.
  monkeypatch.setitem(REWARDS, "bool_r", lambda: Reward("bool_r", lambda p, c, r: c == "y"))
  np.testing.assert_array_equal(combine("bool_r", ["a", "b"], ["y", "n"], ["", ""])[0], [1, 0])


def test_per_sample_python_reward_gets_every_row_field(here):
  rows = [
    {"prompt": "p0", "answer": "7", "tests": ["7", "07"], "id": 0},
    {"prompt": "p1", "answer": "8", "tests": ["9"], "id": 1},
    {"prompt": "p2", "answer": "1", "tests": ["01"], "id": 2},
  ]
  reward = make_reward(f"python:{here}:passes_tests")
  assert reward.form == "fields" and not reward.batched
  _, per = combine(f"python:{here}:passes_tests", ["a", "b", "c"], ["7\n", "9", "01"], rows)
  np.testing.assert_allclose(per[f"python:{here}:passes_tests"], [1.5, 1.0, 1.0])


def test_batched_python_reward_gets_columns_as_lists(here):
  rows = [{"prompt": "a", "answer": "1", "bonus": 0.25}, {"messages": [], "answer": "2"}, "3"]
  reward = make_reward(f"python:{here}:batch_columns")
  assert reward.batched and reward.form == "fields"
  np.testing.assert_allclose(reward(["a", "b", "c"], ["1", "2", "4"], rows), [1.25, 1.0, 0.0])


def test_old_three_argument_form_gets_the_answer(here):
  reward = make_reward(f"python:{here}:old_form")
  assert reward.form == "reference"
  rows = [{"prompt": "a", "answer": "5"}, {"prompt": "b"}, "6", None]
  np.testing.assert_allclose(reward(["a", "b", "c", "d"], ["5", "5", "6", "6"], rows), [1.0, -1.0, 1.0, -1.0])
  # Lambdas and batched callables of three positional parameters take the same form.
  assert Reward("l", lambda p, c, r: 0.0).form == "reference"
  assert Reward("b", lambda ps, cs, rs: [0.0] * len(ps), batched=True).form == "reference"


def test_keyword_only_parameters_select_fields(here):
  reward = make_reward(f"python:{here}:wants_level")
  assert reward.form == "fields" and reward.keywords == {"level"}
  np.testing.assert_allclose(reward(["a"], ["x"], [{"prompt": "a", "level": 3, "answer": "x"}]), [3.0])
  with pytest.raises(ValueError, match=r"'python:.*wants_level' raised TypeError:.*'level'.* on row 0 of the batch"):
    reward(["a"], ["x"], [{"answer": "x"}])


def test_reward_model_like_callable_gets_texts_only():
  """The rm: reward's form: (prompts, completions) and no row field, its third parameter left at its default."""
  seen = []

  def score(prompts, completions, references=None):
    seen.append(references)
    return [0.5] * len(prompts)

  reward = Reward("rm:x", score, batched=True, form="fields")
  np.testing.assert_allclose(reward(["a", "b"], ["1", "2"], [{"answer": "1", "references": "no"}, "2"]), [0.5, 0.5])
  assert seen == [None]


def test_a_reward_that_raises_names_the_row_and_the_reward(here):
  long_row = {"prompt": "b", "answer": "x" * 200}
  with pytest.raises(ValueError) as info:
    combine(f"format,python:{here}:crashes_on_b", ["a", "b"], ["a", "b"], [{"prompt": "a"}, long_row])
  msg = str(info.value)
  assert f"reward 'python:{here}:crashes_on_b' raised RuntimeError: cannot score b on row 1 of the batch: " in msg
  assert "{'prompt': 'b', 'answer': 'xxx" in msg and msg.endswith("...") and "\n" not in msg
  assert len(msg.rpartition("batch: ")[2]) == R.ROW_REPR_CHARS
  assert isinstance(info.value.__cause__, RuntimeError)
  # Batched rewards: the reward and the batch are named.
  with pytest.raises(ValueError, match=r"'boom' \(batched\) raised ZeroDivisionError: .* batch of 2 rows, the first"):
    Reward("boom", lambda ps, cs, **cols: 1 / 0, batched=True)(["a", "b"], ["1", "2"], [{"answer": "1"}, {}])


def test_builtins_need_the_answer_field_and_name_the_row():
  rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "tests": "..."}]
  for name in ("exact_match", "digits"):
    with pytest.raises(
      ValueError, match=rf"reward '{name}' .*'answer' field, which row 1 of the batch lacks: \{{'prompt': '2\+2='"
    ):
      combine(name, ["1+1=", "2+2="], ["2\n", "4\n"], rows)
  # format does not read the answer; a number as the answer reads as its text.
  np.testing.assert_array_equal(combine("format", ["a", "b"], ["2\n", "x"], rows)[0], [1, 0])
  np.testing.assert_array_equal(
    combine("exact_match", ["a", "b"], ["2\n", "4\n"], [{"answer": 2}, {"answer": 5}])[0], [1, 0]
  )


def test_rows_must_be_dicts_or_answers():
  with pytest.raises(ValueError, match=r"row 1 of the batch is a int"):
    combine("format", ["a", "b"], ["1\n", "2\n"], ["1", 2])
  with pytest.raises(ValueError, match=r"'nope': form 'rows' is not one of"):
    Reward("nope", lambda p, c: 0.0, form="rows")
