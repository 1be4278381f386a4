"""RL prompt data (jaxllm.rl.data), the task file generator, and held-out evaluation (jaxllm.rl.eval)
against hand-computed accuracy and pass@k."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from jaxllm.data import ByteTokenizer
from jaxllm.rl import data as rl_data
from jaxllm.rl.eval import evaluate, unescape
from jaxllm.rl.rewards import RewardSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rows_from_files_dirs_and_globs(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "1.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": "4"}\n')
  (tmp_path / "a" / "2.jsonl").write_text(
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "tests": ["x"]}) + "\n"
  )
  rows = rl_data.load_rows(str(tmp_path / "a"))
  assert [r.get("answer") for r in rows] == ["2", "4", None] and rows[2]["tests"] == ["x"]
  assert rl_data.load_rows(str(tmp_path / "a" / "*.jsonl")) == rows
  assert rl_data.load_rows(f"{tmp_path / 'a' / '1.jsonl'},{tmp_path / 'a' / '2.jsonl'}") == rows
  assert rl_data.prompt_text(rows[2]) == "hi"


@pytest.mark.parametrize(
  "line, match",
  [
    ("not json", r"bad.jsonl:1: not valid JSON"),
    ("[1, 2]", r"bad.jsonl:1: expected a JSON object"),
    ('{"answer": "2"}', r"bad.jsonl:1: a row needs 'prompt'.*'answer'"),
    ('{"prompt": ""}', r"'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] must be an object with string 'role' and 'content'"),
  ],
)
def test_bad_rows_name_the_file_line_and_fix(tmp_path, line, match):
  (tmp_path / "bad.jsonl").write_text(line + "\n")
  with pytest.raises(ValueError, match=match):
    rl_data.load_rows(str(tmp_path / "bad.jsonl"))


def test_missing_data_says_what_to_give(tmp_path):
  with pytest.raises(ValueError, match="no such file, directory or glob match"):
    rl_data.load_rows(str(tmp_path / "nope.jsonl"))


def test_task_generator_writes_disjoint_rl_files(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxllm.data.tasks",
      "addition",
      str(tmp_path),
      "--train",
      "300",
      "--eval",
      "50",
      "--sft",
      "10",
      "--pairs",
      "5",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  train, held = rl_data.load_rows(str(tmp_path / "train.jsonl")), rl_data.load_rows(str(tmp_path / "eval.jsonl"))
  assert len(train) == 300 and len(held) == 50
  assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # the held-out split is disjoint
  assert all(str(eval(r["prompt"].strip().rstrip("="))) == r["answer"] for r in train[:20])
  assert (tmp_path / "sft.txt").read_text().count("\n") == 10 and (tmp_path / "pairs.jsonl").exists()


def test_unescape_stop_strings():
  assert unescape("\\n") == "\n" and unescape("a\\tb") == "a\tb" and unescape("\\\\n") == "\\n" and unescape("x") == "x"


class ScriptedEngine:
  """Returns given completions: greedy ones (temperature 0), then sampled ones in request order."""

  def __init__(self, greedy, sampled):
    self.greedy, self.sampled = greedy, sampled

  def generate(self, ids, sp):
    sps = sp if isinstance(sp, list) else [sp] * len(ids)
    texts = self.greedy if sps[0].temperature == 0 else self.sampled
    assert len(texts) == len(ids)
    tok = ByteTokenizer()
    return [
      SimpleNamespace(output=tok.encode(t), finish_reason="stop" if t.endswith("\n") else "length") for t in texts
    ]


def test_evaluate_accuracy_and_pass_at_k_by_hand():
  rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in (1, 2, 3, 4)]
  greedy = ["2\n", "5\n", "6\n", "7"]  # right, wrong, right, unfinished
  sampled = ["1\n", "2\n", "4\n", "9\n", "1\n", "1\n", "8\n", "8"]  # k=2 a row: hit, hit, miss, hit
  res = evaluate(ScriptedEngine(greedy, sampled), ByteTokenizer(), rows, RewardSpec.parse("exact_match"), 8, k=2)
  assert res["accuracy"] == 0.5 and res["k"] == 2
  hit = np.array([1, 1, 0, 1], float)
  assert res["pass_at_k"] == 0.75 and res["pass_at_k_se"] == pytest.approx(hit.std(ddof=1) / 2)
  assert res["truncated"] == 0.25 and res["mean_len"] == pytest.approx(np.mean([2, 2, 2, 1]))


def test_rl_run_on_a_prompt_file_with_a_reward_reading_a_row_field(tmp_path, monkeypatch):
  """`rl.data` rows with an extra field; a python: reward receives it; held-out rows from
  `rl.eval_data`; generation stops at `rl.stop`."""
  from jaxllm.config import load_config
  from jaxllm.rl.loop import rl_train

  rows = [{"prompt": f"\n{a}+1=", "answer": str(a + 1), "bonus": a % 2} for a in range(8)]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
  (tmp_path / "myreward.py").write_text("def score(prompt, completion, **row):\n  return float(row['bonus'])\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  cfg = load_config(
    [],
    [
      "model.n_layers=2",
      "model.d_model=64",
      "model.d_ff=128",
      "model.vocab_size=259",
      "model.max_seq_len=64",
      "mesh.dp=8",
      "train.warmup_steps=0",
      "train.steps=2",
      "rl.group_size=4",
      "rl.prompts_per_step=4",
      "rl.max_new_tokens=6",
      "rl.eval_every=0",
      "serve.page_size=4",
      "serve.num_pages=256",
      "rl.stop=\\n",
      f"rl.data={tmp_path / 'train.jsonl'}",
      f"rl.eval_data={tmp_path / 'eval.jsonl'}",
      "rl.rewards=exact_match:1.0,python:myreward:score:1.0",
      f"train.out_dir={tmp_path / 'run'}",
    ],
  )
  summary = rl_train(cfg, progress=False, log=lambda *_: None)
  lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  steps = [line for line in lines if "reward" in line]
  assert [line["step"] for line in steps] == [1, 2] and summary["evals"][0][0] == 0
  for line in steps:  # 4 prompts a step from 8 rows in shuffled epochs: the bonus mean is a multiple of 1/4
    assert line["reward/python:myreward:score"] * 4 == pytest.approx(round(line["reward/python:myreward:score"] * 4))
    assert 0 <= line["truncated"] <= 1 and line["completion_len"] <= 6
  # Every sample of an epoch's prompts: 2 steps x 4 prompts = the 8 rows once, so the bonus averages 0.5.
  assert np.mean([line["reward/python:myreward:score"] for line in steps]) == pytest.approx(0.5)
