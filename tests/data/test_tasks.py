"""jaxllm.data.tasks: deterministic addition problems, a held-out split disjoint from training,
correct answers, answer extraction and the SFT text format."""

import re

import pytest

from jaxllm.data import load_texts
from jaxllm.data.tasks import TASKS, Addition, AdditionTask, answer_line, extract_answer, make_task


def test_problems_are_deterministic_and_seeded():
  t = AdditionTask(seed=3)
  assert t.problems(200) == AdditionTask(seed=3).problems(200)
  assert t.problems(200, seed=3) == t.problems(200)  # None = the task's seed
  assert t.problems(50) == t.problems(200)[:50]  # a prefix of a longer draw
  assert t.problems(200, seed=4) != t.problems(200)
  assert t.problems(200, "heldout") == AdditionTask(seed=3).problems(200, "heldout")
  assert t.problems(0) == [] and t.problems(0, "heldout") == []


def test_heldout_is_disjoint_from_train_and_fixed_by_the_pair():
  t = AdditionTask(digits_min=1, digits_max=2)
  train = {frozenset((p.a, p.b)) for s in range(3) for p in t.problems(3000, "train", seed=s)}
  held = {frozenset((p.a, p.b)) for p in t.problems(500, "heldout")}
  assert held and not train & held
  # The split depends on the problem only: same pair, same split, whatever the seed or digit range;
  # a+b and b+a always together.
  other = AdditionTask(digits_min=2, digits_max=4, seed=99)
  for p in t.problems(300, "heldout"):
    assert other.split_of(p) == "heldout" and other.split_of(Addition(p.b, p.a)) == "heldout"
  # Roughly heldout_fraction of all 2-digit-or-less pairs is held out.
  pairs = [Addition(a, b) for a in range(100) for b in range(100)]
  frac = sum(t.split_of(p) == "heldout" for p in pairs) / len(pairs)
  assert 0.05 < frac < 0.15


def test_default_digit_range():
  ps = AdditionTask().problems(1000)
  assert {len(str(p.a)) for p in ps} == {1, 2} and max(p.a + p.b for p in ps) <= 198


def test_digit_ranges_answers_and_prompts():
  t = AdditionTask(digits_min=2, digits_max=3, seed=1)
  ps = t.problems(500) + t.problems(100, "heldout")
  for p in ps:
    assert 10 <= p.a <= 999 and 10 <= p.b <= 999
    assert t.question(p) == f"{p.a}+{p.b}=" and t.prompt(p) == "\n" + t.question(p)
    assert int(t.answer(p)) == p.a + p.b and t.answer(p) == str(p.a + p.b)
  # Both digit counts occur for each operand; 1-digit operands include 0.
  assert {len(str(p.a)) for p in ps} == {2, 3}
  ones = AdditionTask(digits_min=1, digits_max=1).problems(2000)
  assert {p.a for p in ones} == set(range(10))
  assert t.answer(Addition(999, 1)) == "1000" and t.prompt(Addition(0, 7)) == "\n0+7="


def test_bad_arguments():
  with pytest.raises(ValueError, match="digits_min"):
    AdditionTask(digits_min=0)
  with pytest.raises(ValueError, match="digits_min"):
    AdditionTask(digits_min=3, digits_max=2)
  with pytest.raises(ValueError, match="heldout_fraction"):
    AdditionTask(heldout_fraction=1.0)
  with pytest.raises(ValueError, match="split"):
    AdditionTask().problems(3, split="test")
  with pytest.raises(ValueError, match="no 'heldout' problems.*widen the digit range"):
    AdditionTask(digits_min=1, digits_max=1, heldout_fraction=0.001).problems(1, "heldout")
  with pytest.raises(ValueError, match="known tasks"):
    make_task("multiplication")
  assert isinstance(make_task("addition", digits_max=2), AdditionTask) and "addition" in TASKS


@pytest.mark.parametrize(
  "completion, expected",
  [
    ("357\n", "357"),
    ("357\n12+1=13\n", "357"),  # only the first line counts
    (" 357 \n", "357"),  # stripped
    ("0\n", "0"),
    ("357", None),  # no end marker: unfinished
    ("", None),
    ("\n", None),  # empty answer
    ("3 5\n", None),
    ("-3\n", None),
    ("35a\n", None),
    ("٣٥\n", None),  # non-ASCII digits are not an answer
    ("1e3\n", None),
  ],
)
def test_extract_answer(completion, expected):
  assert extract_answer(completion) == expected
  assert AdditionTask.extract_answer(completion) == expected


def test_answer_line():
  assert answer_line("abc \nx") == "abc" and answer_line("abc") is None and answer_line("\n") == ""


def test_sft_text_and_file(tmp_path):
  t = AdditionTask(seed=5)
  text = t.sft_text(300)
  lines = text.split("\n")
  assert text.endswith("\n") and lines[-1] == "" and len(lines) == 301
  for line, p in zip(lines, t.problems(300)):
    m = re.fullmatch(r"([0-9]+)\+([0-9]+)=([0-9]+)", line)
    assert m, line
    a, b, c = map(int, m.groups())
    assert (a, b) == (p.a, p.b) and a + b == c and t.split_of(p) == "train"
    assert line == t.question(p) + t.answer(p)
  # In the SFT stream every question follows a newline, which is what prompt(p) feeds the model:
  # after a leading newline, the text is prompt + answer for each problem, then the end marker.
  ps = t.problems(300)
  assert "\n" + text == "".join(t.prompt(p) + t.answer(p) for p in ps) + "\n"
  assert all(extract_answer(t.answer(p) + "\n") == t.answer(p) for p in ps)
  assert t.sft_text(300, seed=6) != text
  path = t.write_sft_file(str(tmp_path / "add.txt"), 300)
  with open(path, encoding="utf-8", newline="") as f:
    assert f.read() == text
  assert load_texts([path]) == [text]  # what train.py train.data=PATH reads
