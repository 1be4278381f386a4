"""serve.py end to end: a training checkpoint (or a Hugging Face directory, over a mesh) loads and
`generate` prints the engine's greedy text."""

import os

import jax
import pytest
from test_serve import DENSE, full_forward_greedy, params_of

import serve
from jaxllm.config import Config, MeshConfig
from jaxllm.data import load_tokenizer
from jaxllm.model.params import model_def
from jaxllm.parallel import build_mesh
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.optim import make_optimizer
from jaxllm.train.state import init_state, state_shardings


def test_generate_from_checkpoint(tmp_path, capsys):
  config = Config(model=DENSE)
  mesh, plan = build_mesh(MeshConfig(dp=2, tp=2), jax.devices()[:4])  # trained on a 4-device mesh
  mdef = model_def(DENSE)
  tx = make_optimizer(config.train, mdef.logical)
  state = init_state(mdef, tx, state_shardings(mdef, tx, mesh, plan), seed=3)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(0, state, {}, config)
  ckpt.close()
  tok = load_tokenizer("byte")
  prompt = "abcabc"
  want = full_forward_greedy(DENSE, [tok.encode(prompt)], 5, params=jax.device_get(state.params))[0]
  serve.main(
    ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", prompt, "--max-tokens", "5", "serve.page_size=8"]
  )
  out = capsys.readouterr().out
  assert prompt + tok.decode(want) in out


def test_generate_from_hf_dir_on_a_mesh(tmp_path, capsys):
  """`--hf DIR --mesh meshes/cpu-8.toml`: Hugging Face weights served over dp=4 x tp=2."""
  io = pytest.importorskip("jaxllm.io")
  params = params_of(DENSE)
  hf_dir = io.export_hf(jax.device_get(params), DENSE, str(tmp_path / "hf"))
  tok = load_tokenizer("byte")
  prompt = "abcabc"
  want = full_forward_greedy(DENSE, [tok.encode(prompt)], 5)[0]
  mesh_file = os.path.join(os.path.dirname(__file__), "..", "..", "meshes", "cpu-8.toml")
  serve.main(
    [
      "generate",
      "--hf",
      hf_dir,
      "--mesh",
      mesh_file,
      "--tokenizer",
      "byte",
      "--prompt",
      prompt,
      "--max-tokens",
      "5",
      "serve.page_size=8",
    ]
  )
  out = capsys.readouterr().out
  assert prompt + tok.decode(want) in out
