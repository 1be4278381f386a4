"""The RL loop end to end on a tiny random model (addition task): eta = 0 with the generation thread
equals the synchronous loop bit for bit; with eta = 1 no consumed sample is more than one version
stale, also across a kill and resume; the learner is jaxllm.train's step (checkpoints load as usual)."""
import json
import os

import numpy as np

from jaxllm.config import load_config
from jaxllm.io.checkpoint import load_params
from jaxllm.rl.loop import rl_train

MESH = os.path.join(os.path.dirname(__file__), "..", "meshes", "cpu-8.toml")
TIMING = ("gen_tok_s", "train_tok_s")


def _cfg(out, *extra):
  return load_config([], [f"mesh={MESH}", "model.n_layers=2", "model.d_model=64", "model.d_ff=128",
                          "model.vocab_size=259", "model.max_seq_len=64", "train.steps=3", "train.lr=1e-3",
                          "train.warmup_steps=0", "train.save_every=1", "rl.group_size=4", "rl.prompts_per_step=4",
                          "rl.max_new_tokens=4", "rl.eval_problems=16", "rl.eval_every=0", "serve.page_size=4",
                          "serve.num_pages=256", f"train.out_dir={out}", *extra])


def _run(cfg, **kw):
  return rl_train(cfg, progress=False, log=lambda *_: None, **kw)


def test_eta0_async_equals_sync_and_staleness_bound_across_resume(tmp_path):
  sync = _run(_cfg(tmp_path / "sync", "rl.eta=0", "rl.async_rollouts=false"))
  asyn = _run(_cfg(tmp_path / "async", "rl.eta=0"))
  assert len(sync["history"]) == len(asyn["history"]) == 3
  for a, b in zip(sync["history"], asyn["history"]):
    assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
  assert all(h["staleness_max"] == 0 for h in asyn["history"])
  assert sync["last_acc"] == asyn["last_acc"]

  cfg = _cfg(tmp_path / "eta1", "rl.eta=1", "train.steps=4")
  first = _run(cfg, stop_after=2)                  # "killed" after 2 steps (checkpoint at 2)
  assert first["steps"] == 2
  second = _run(cfg)
  assert second["history"][0]["step"] == 3 and second["steps"] == 4
  for h in first["history"] + second["history"]:
    assert h["staleness_max"] <= 1 and np.isfinite(h["loss"]) and 0 <= h["reward"] <= 1
  assert any(h["staleness_max"] == 1 for h in first["history"] + second["history"])
  lines = [json.loads(l) for l in open(tmp_path / "eta1" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2, 3, 4] and "heldout_acc" in lines[-1]
  config, params = load_params(str(tmp_path / "eta1" / "checkpoints"))
  assert config.rl.eta == 1 and params["layers"]["wq"].shape[0] == 2
