"""The post-training workflow end to end, on a tiny Hugging Face model made here (random weights, a
tokenizer with a chat template, two EOS ids in generation_config.json): SFT on chat rows -> RL on a
prompt file with a python reward that reads a row field -> `python -m jaxllm.rl.eval` -> export to a
Hugging Face directory -> `transformers` loads it and its logits equal jaxllm's -> the server, started
on the export as `serve.py --hf` starts it, answers a chat request and stops on the second EOS id."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from test_hf import _close, _forward, _hf_model
from test_http import serving

from jaxllm.config import Config, ServeConfig, load_config
from jaxllm.io import export_run, load_hf_config, load_model
from jaxllm.rl import eval as rl_eval
from jaxllm.rl.loop import rl_train
from jaxllm.train.loop import train

transformers = pytest.importorskip("transformers", reason="the workflow starts from a transformers-made model")
torch = pytest.importorskip("torch", reason="the export is read back with torch")
openai = pytest.importorskip("openai", reason="the served export is queried with the official client")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = os.path.join(ROOT, "meshes", "cpu-8.toml")
TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
WORDS = ["<unk>", "user", "assistant", "hello", "world", "how", "are", "you", "fine", "thanks"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 10, 11, 12
REWARD = "def score(prompt, completion, **row):\n  return float(row['target'] in completion)\n"


def _hf_dir(path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  _hf_model("qwen2", path)
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIALS)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE
  )
  fast.save_pretrained(path)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [12, 10]}, f)  # the end of a turn, then the end of text
  return path


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def test_hf_model_sft_rl_eval_export_serve(tmp_path, monkeypatch):
  src = _hf_dir(str(tmp_path / "hf"))
  assert load_model(src).eos_ids == (12, 10)
  common = [f"mesh={MESH}", "mesh.dp=8", "mesh.tp=1", "train.warmup_steps=0", "train.sample_tokens=0"]

  # SFT on chat rows, from the Hugging Face weights and tokenizer (what train.py --init-from-hf sets).
  chats = [
    {"messages": [{"role": "user", "content": "hello " + w}, {"role": "assistant", "content": "fine thanks"}]}
    for w in ("world", "you", "how are you", "world world")
  ] * 8
  sft = load_config(
    [],
    [
      *common,
      f"train.data={_write(tmp_path / 'chat.jsonl', chats)}",
      f"train.init_from_hf={src}",
      f"train.tokenizer={src}/tokenizer.json",
      "train.steps=6",
      "train.seq_len=32",
      "train.batch_size=8",
      "train.lr=1e-3",
      "train.eval_every=0",
      f"train.out_dir={tmp_path / 'sft'}",
    ],
    base=Config(model=load_hf_config(src)),
  )
  done = train(sft, progress=False, log=lambda *_: None)
  assert done["steps"] == 6 and done["last_loss"] < done["first_loss"]

  # RL from the SFT checkpoint on chat prompts; the reward reads the row's "target" field.
  (tmp_path / "wf_reward.py").write_text(REWARD)
  monkeypatch.syspath_prepend(str(tmp_path))
  rows = [
    {"messages": [{"role": "user", "content": "hello " + w}], "target": t}
    for w, t in (("world", "fine"), ("you", "thanks"), ("how", "fine"), ("are", "you"))
  ]
  data = _write(tmp_path / "rl.jsonl", rows)
  rl = load_config(
    [],
    [
      *common,
      f"rl.init_from={tmp_path / 'sft' / 'checkpoints'}",
      f"rl.data={data}",
      f"rl.eval_data={data}",
      "rl.rewards=python:wf_reward:score",
      "rl.group_size=4",
      "rl.prompts_per_step=4",
      "rl.max_new_tokens=4",
      "rl.eval_k=2",
      "rl.eval_every=0",
      "serve.page_size=4",
      "serve.num_pages=128",
      "train.steps=2",
      "train.lr=1e-4",
      f"train.out_dir={tmp_path / 'rl'}",
    ],
  )
  summary = rl_train(rl, progress=False, log=lambda *_: None)
  lines = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl")]
  assert [line["step"] for line in lines if "reward" in line] == [1, 2]
  assert "heldout_pass@2" in lines[-1] and summary["evals"][-1][0] == 2
  ckpt = str(tmp_path / "rl" / "checkpoints")

  # Standalone evaluation of the RL checkpoint.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = rl_eval.main(
      ["--model", ckpt, "--data", data, "--rewards", "python:wf_reward:score", "--k", "2", "--max-new-tokens", "4"]
    )
  assert rc == 0 and "accuracy (greedy)" in out.getvalue() and "pass@2" in out.getvalue(), out.getvalue()

  # Export: transformers reads it, its logits equal jaxllm's on the RL checkpoint's parameters.
  export = export_run(ckpt, str(tmp_path / "export"), log=lambda *_: None)
  ours = load_model(ckpt)
  tokens = np.array([[11, 1, 3, 4, 12, 11, 2], [3, 5, 6, 7, 12, 10, 8]], np.int32)
  model = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.float().numpy()
  _close(_forward(ours.cfg, ours.params, tokens), theirs)
  assert json.load(open(os.path.join(export, "generation_config.json")))["eos_token_id"] == [12, 10]

  # Serve the export: a chat request answers; forcing the second EOS id ends the turn on it.
  from jaxllm.serve.http.server import build

  served = load_model(export)
  assert served.eos_ids == (12, 10) and served.chat_template == TEMPLATE
  app, service = build(served, ServeConfig(page_size=4, num_pages=64, max_running=4))
  try:
    with serving(app) as url:
      client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
      chat = [{"role": "user", "content": "hello world"}]
      plain = client.chat.completions.create(model=app.state.info.name, messages=chat, max_tokens=4)
      assert plain.choices[0].finish_reason in ("stop", "length")
      forced = client.chat.completions.create(
        model=app.state.info.name, messages=chat, max_tokens=4, logit_bias={"10": 100}
      )
      assert forced.choices[0].finish_reason == "stop" and forced.usage.completion_tokens == 1
  finally:
    service.close()
