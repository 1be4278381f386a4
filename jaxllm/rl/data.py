"""RL prompt data: rows of jsonl files (`rl.data`, `rl.eval_data`), each a JSON object with "prompt"
(a string fed to the model as it is) or "messages" (a chat, rendered with the model's chat template
and a generation prompt), plus any other fields (an answer, tests, metadata) that the rewards receive
with the completion (jaxllm.rl.rewards).

A spec is a file, a directory (every *.jsonl below it, sorted) or a glob, or several of them joined
by commas. The rows keep file order; which rows a learner step uses is a function of (train.seed,
step) alone (jaxllm.data.loader.epoch_indices: shuffled epochs), so a run, and a resumed run, draw the
same prompts.

Without `rl.data`, the built-in addition task supplies rows of the same form, {"prompt", "answer"};
`python -m jaxllm.data.tasks addition OUT_DIR` writes them as files.
"""

from __future__ import annotations

import glob
import os

from jaxllm.data.chat import ChatFormat
from jaxllm.data.corpus import jsonl_records
from jaxllm.data.tasks import make_task


def _files(spec: str) -> list[str]:
  files = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    if os.path.isdir(part):
      found = sorted(glob.glob(os.path.join(part, "**", "*.jsonl"), recursive=True))
      if not found:
        raise ValueError(f"RL data directory {part} holds no .jsonl files")
    elif os.path.isfile(part):
      found = [part]
    else:
      found = sorted(glob.glob(part, recursive=True))
      if not found:
        raise ValueError(
          f"RL data {part!r}: no such file, directory or glob match; give jsonl files of "
          '{"prompt": ...} or {"messages": [...]} rows'
        )
    files += found
  return files


def check_row(row, where: str) -> dict:
  """`row` if it is a valid RL row, else a ValueError naming `where` and what is wrong."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object with 'prompt' or 'messages', found a {type(row).__name__}")
  if "prompt" in row:
    if not isinstance(row["prompt"], str) or not row["prompt"]:
      raise ValueError(f"{where}: 'prompt' must be a non-empty string")
  elif "messages" in row:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
      raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
  else:
    raise ValueError(
      f"{where}: a row needs 'prompt' (a string) or 'messages' (a chat); it has "
      f"{', '.join(map(repr, sorted(row))) or 'no keys'}"
    )
  return row


def load_rows(spec: str) -> list[dict]:
  """The rows of every jsonl file of `spec`, in order; blank lines are skipped."""
  rows = [check_row(row, where) for path in _files(spec) for where, row in jsonl_records(path)]
  if not rows:
    raise ValueError(f"RL data {spec!r} holds no rows")
  return rows


def task_rows(rl, seed: int, split: str, n: int, stream_seed: int | None = None) -> list[dict]:
  """Rows {"prompt", "answer"} of the built-in task (rl.task), `n` problems of `split`."""
  task = make_task(rl.task, digits_min=rl.digits_min, digits_max=rl.digits_max, seed=seed)
  probs = task.problems(n, split=split, seed=stream_seed)
  return [{"prompt": task.prompt(p), "answer": task.answer(p)} for p in probs]


def prompt_ids(row: dict, tokenizer, chat_template=None) -> list[int]:
  """The token ids a row's prompt feeds the model: "prompt" encoded as it is, "messages" rendered by
  `chat_template` (a jaxllm.data.chat.ChatFormat; the generation prompt included)."""
  if "prompt" in row:
    return list(tokenizer.encode(row["prompt"]))
  if chat_template is None:
    raise ValueError("a 'messages' row needs the model's chat template (none was loaded)")
  return list(chat_template.encode(row["messages"]))


def prompt_text(row: dict) -> str:
  """A row's prompt as text for rewards and logs: "prompt", or the last user message."""
  if "prompt" in row:
    return row["prompt"]
  users = [m["content"] for m in row["messages"] if m["role"] == "user"]
  return users[-1] if users else row["messages"][-1]["content"]


def chat_renderer(source: str | None, tokenizer):
  """The renderer of "messages" rows: the model's chat template (`source`, Jinja), or the default
  template the SFT data and the server use for a model without one (jaxllm.data.chat)."""
  return ChatFormat(source, tokenizer)
