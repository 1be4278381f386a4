"""jaxllm.io.load_model: a training checkpoints folder and a Hugging Face directory (built by
`transformers`) load into config, params, tokenizer and every end-of-sequence id; bad paths fail with
one line that names the path and the fix."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from test_serve import DENSE

from jaxllm.config import Config, MeshConfig, TrainConfig
from jaxllm.data import ByteTokenizer, HFTokenizer
from jaxllm.io import LoadedModel, ModelLoadError, eos_ids, load_hf, load_hf_config, load_model
from jaxllm.model.params import model_def
from jaxllm.parallel import build_mesh, param_shardings
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.optim import make_optimizer
from jaxllm.train.state import init_state

CFG = dataclasses.replace(DENSE, vocab_size=384)  # holds the byte tokenizer's eos (257)
VOCAB = ["a", "b", "</s>", "<|im_end|>", "c", "d", "e", "f"]  # "</s>" = 2
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)


def _tokenizer_files(directory):
  """A WordLevel tokenizer.json with "</s>" named as eos, a chat template, and a generation_config.json
  listing two EOS ids (and one the 256-id models cannot produce)."""
  os.makedirs(directory, exist_ok=True)
  _write_json(
    os.path.join(directory, "tokenizer.json"),
    {"version": "1.0", "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(VOCAB)}, "unk_token": "a"}},
  )
  _write_json(os.path.join(directory, "tokenizer_config.json"), {"eos_token": "</s>", "chat_template": TEMPLATE})
  _write_json(os.path.join(directory, "generation_config.json"), {"eos_token_id": [5, 7, 300]})
  return str(directory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  from test_hf import _hf_model  # transformers builds and saves the model

  path = str(tmp_path_factory.mktemp("qwen3"))
  _hf_model("qwen3", path)
  _tokenizer_files(path)
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  _write_json(os.path.join(path, "config.json"), dict(hf, eos_token_id=7))  # a repeat of generation_config's
  return path


def _save_checkpoint(directory, config, seed=3):
  mdef = model_def(config.model)
  state = init_state(mdef, make_optimizer(config.train, mdef.logical), None, seed=seed)
  ckpt = Checkpointer(directory, async_save=False)
  ckpt.save(0, state, {}, config)
  ckpt.close()
  return jax.device_get(state.params)


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def test_checkpoint_folder(tmp_path):
  params = _save_checkpoint(str(tmp_path / "run" / "checkpoints"), Config(model=CFG))
  m = load_model(str(tmp_path / "run" / "checkpoints"))
  assert isinstance(m, LoadedModel) and m.cfg == CFG and _same(m.params, params)
  assert isinstance(m.tokenizer, ByteTokenizer) and m.tokenizer_spec == "byte" and m.eos_ids == (257,)
  assert m.name == "run" and m.chat_template is None and m.run_config.model == CFG
  # a run's out_dir finds its checkpoints; run-only fields can change; shardings place the params
  mesh, plan = build_mesh(MeshConfig(tp=2), jax.devices()[:2])
  m2 = load_model(str(tmp_path / "run"), shardings=lambda mdef: param_shardings(mdef, mesh, plan), max_seq_len=256)
  assert m2.cfg == dataclasses.replace(CFG, max_seq_len=256) and _same(m2.params, params)
  want = param_shardings(model_def(CFG), mesh, plan)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, m2.params, want)))


def test_checkpoint_of_a_run_started_from_hf_keeps_its_eos_ids(tmp_path):
  """train.tokenizer pointing into a Hugging Face directory brings that directory's EOS ids along."""
  tok_dir = _tokenizer_files(tmp_path / "tok")
  _save_checkpoint(str(tmp_path / "ckpt"), Config(model=CFG, train=TrainConfig(tokenizer=f"{tok_dir}/tokenizer.json")))
  m = load_model(str(tmp_path / "ckpt"))
  assert isinstance(m.tokenizer, HFTokenizer) and m.eos_ids == (5, 7, 300, 2)  # 300 < vocab_size=384
  assert m.request_defaults == {"add_special_tokens": False}  # the run trained without the tokenizer's BOS
  assert load_model(str(tmp_path / "ckpt"), tokenizer="byte").eos_ids == (257,)


def test_hf_dir(hf_dir):
  m = load_model(hf_dir)
  cfg, params = load_hf(hf_dir)
  assert m.cfg == cfg == load_hf_config(hf_dir) and _same(m.params, params) and m.run_config is None
  assert isinstance(m.tokenizer, HFTokenizer) and m.tokenizer.eos_id == 2
  assert m.tokenizer_spec == os.path.join(hf_dir, "tokenizer.json") and m.chat_template == TEMPLATE
  # generation_config's [5, 7, 300], config.json's 7, the tokenizer's 2: 300 is past vocab_size=256
  assert m.eos_ids == (5, 7, 2) and m.name == os.path.basename(hf_dir)
  assert m.request_defaults == {}  # its generation_config.json has no sampling defaults
  assert eos_ids(256, m.tokenizer) == (5, 7, 2) and eos_ids(256, ByteTokenizer(), hf_dir) == (5, 7)


def test_bad_paths_fail_with_one_line(hf_dir, tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "config_only").mkdir()
  _write_json(tmp_path / "config_only" / "config.json", {})
  no_tok = tmp_path / "no_tokenizer"
  shutil.copytree(hf_dir, no_tok)
  os.remove(no_tok / "tokenizer.json")
  lost_tok = _tokenizer_files(tmp_path / "lost")
  _save_checkpoint(str(tmp_path / "ckpt"), Config(model=CFG, train=TrainConfig(tokenizer=f"{lost_tok}/tokenizer.json")))
  shutil.rmtree(lost_tok)
  cases = [
    (tmp_path / "nowhere", {}, "no such directory; pass a training run's checkpoints folder"),
    (tmp_path / "empty", {}, "is neither a checkpoints folder nor a Hugging Face model directory; pass"),
    (tmp_path / "config_only", {}, r"has config.json but no \*.safetensors weights"),
    (no_tok, {}, "has no tokenizer.json; copy the model's tokenizer files"),
    (tmp_path / "ckpt", {}, "the tokenizer of .*ckpt does not load: tokenizer '.*lost/tokenizer.json': no file"),
    (hf_dir, {"d_model": 32}, r"\['d_model'\] would change the weights"),
    (hf_dir, {"step": 3}, "is a Hugging Face directory, which has no steps"),
  ]
  for path, kw, needle in cases:
    with pytest.raises(ModelLoadError, match=needle) as e:
      load_model(str(path), **kw)
    assert "\n" not in str(e.value)
    if "d_model" not in kw:
      assert str(path) in str(e.value)
  assert load_model(str(no_tok), tokenizer="byte").eos_ids == (5, 7)  # an explicit tokenizer instead
