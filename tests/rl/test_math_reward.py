"""jaxllm.rl.rewards' math reward: final-answer extraction (GSM8K "####", \\boxed{...}, the last
number) and comparison by value with the row's "answer", on a table of hand-written completions."""

import threading

import numpy as np
import pytest

from jaxllm.rl import rewards as R
from jaxllm.rl.rewards import RewardSpec, combine, final_answer

# (completion, reference answer, expected score)
MATH_CASES = [
  # GSM8K "####" answers: the rest of the line after the last "####"
  ("Janet has 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18", "18", 1),
  ("#### 18", "#### 18", 1),
  ("She earns 18.\n#### 17", "18", 0),
  ("#### 42\nThen some chatter about 17 apples.", "42", 1),
  ("#### 1,000", "1000", 1),
  ("#### -5", "-5", 1),
  ("#### 5", "-5", 0),
  ("#### $42", "42", 1),
  ("####", "42", 0),
  ("The answer is 42.", "#### 42", 1),
  ("The answer is 42.", "Step: 6*7 = 42\n#### 42", 1),  # a whole GSM8K solution as the answer
  # \boxed{...}: the last complete one, braces nested
  ("So the answer is \\boxed{42}.", "42", 1),
  ("\\boxed{\\frac{1}{2}}", "0.5", 1),
  ("\\boxed{\\frac{1}{2}}", "1/2", 1),
  ("\\boxed{\\dfrac{3}{4}}", "0.75", 1),
  ("\\boxed{-\\frac{3}{4}}", "-0.75", 1),
  ("\\boxed{\\frac{3}{4}}", "-0.75", 0),
  ("First \\boxed{2}, no wait \\boxed{3}", "3", 1),
  ("First \\boxed{2}, no wait \\boxed{3}", "2", 0),
  ("\\boxed{42}", "\\boxed{42}", 1),
  ("\\boxed{\\$18}", "18", 1),
  ("\\boxed{10\\text{ cm}}", "10", 1),
  ("\\boxed{42 dollars}", "42", 1),
  ("\\boxed{1,000}", "1000", 1),
  ("The answer is \\boxed{4", "4", 0),  # unfinished: the generation was cut off
  ("\\boxed{}", "0", 0),
  # plain text: the last number; fractions, decimals, separators, signs, units
  ("3/4", "0.75", 1),
  ("0.75", "\\frac{3}{4}", 1),
  ("The answer is 2.50", "2.5", 1),
  ("It is 12.0", "12", 1),
  ("1 then 2 then 3", "3", 1),
  ("1 then 2 then 3", "1", 0),
  ("In total 1,000,000 apples", "1000000", 1),
  ("The temperature is -3 degrees", "-3", 1),
  ("The temperature is \u22123 degrees", "-3", 1),  # a unicode minus
  ("The temperature is 3 degrees", "-3", 0),
  ("She pays $42.", "42", 1),
  ("She pays 42 dollars.", "42", 1),
  ("It grew by 42%.", "42", 1),
  ("We get $\\frac{3}{4}$ of the pie.", "0.75", 1),
  ("The answer is 41", "42", 0),
  ("42", "42.0", 1),
  ("42", "1,000", 0),
  # malformed
  ("no number here", "42", 0),
  ("", "42", 0),
  ("   \n", "42", 0),
  ("42", "", 0),  # a blank reference matches nothing
]


@pytest.mark.parametrize("completion, answer, expected", MATH_CASES)
def test_math_reward_table(completion, answer, expected):
  assert R.math_match("q", completion, answer) == expected


def test_math_reward_through_combine_reads_the_rows_answer():
  completions = [c for c, _, _ in MATH_CASES]
  rows = [{"prompt": "q", "answer": a, "source": "table"} for _, a, _ in MATH_CASES]
  total, per = combine("math:2", ["q"] * len(rows), completions, rows)
  np.testing.assert_array_equal(per["math"], [e for _, _, e in MATH_CASES])
  np.testing.assert_array_equal(total, 2 * per["math"])
  # A number as the answer (a JSON int) reads as its text.
  assert combine("math", ["q"], ["#### 7"], [{"answer": 7}])[0][0] == 1.0


def test_math_reward_needs_the_answer_field():
  with pytest.raises(
    ValueError, match=r"reward 'math' .*'answer' field, which row 1 of the batch lacks: \{'prompt': 'b'\}"
  ):
    combine("math", ["a", "b"], ["1", "2"], [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])


@pytest.mark.parametrize(
  "text, found",
  [
    ("x\n#### 42 \nmore", ("####", "42")),
    ("#### 1\n#### 2", ("####", "2")),
    ("#### \nno answer", None),
    ("a \\boxed{\\frac{1}{\\sqrt{2}}} b", ("boxed", "\\frac{1}{\\sqrt{2}}")),
    ("\\boxed{1} then \\boxed{2", ("boxed", "1")),  # the last complete box
    ("\\boxed{\\{1, 2\\}}", ("boxed", "\\{1, 2\\}")),  # escaped braces do not count
    ("\\boxed{", None),
    ("\\fbox{7}", ("boxed", "7")),
    ("just 5", ("text", "just 5")),
    (" \n ", None),
  ],
)
def test_final_answer_extraction(text, found):
  assert final_answer(text) == found


def test_math_reward_runs_outside_the_main_thread():
  """math_verify's timeout is a SIGALRM, allowed in the main thread only: elsewhere it runs unbounded."""
  out = []
  t = threading.Thread(target=lambda: out.append(R.math_match("", "\\boxed{\\frac{1}{2}}", "0.5")))
  t.start()
  t.join()
  assert out == [1.0]


def test_math_is_registered():
  spec = RewardSpec.parse("math:1.0,format:0.1")
  assert spec.names == ("math", "format") and "math" in R.known_rewards()
