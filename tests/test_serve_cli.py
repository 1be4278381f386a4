"""serve.py end to end: a training checkpoint loads and `generate` prints the engine's greedy text."""
import jax

import serve
from jaxllm.config import Config
from jaxllm.data import load_tokenizer
from jaxllm.model.params import model_def
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.optim import make_optimizer
from jaxllm.train.state import init_state, state_shardings
from jaxllm.parallel import build_mesh
from jaxllm.config import MeshConfig
from test_serve import DENSE, full_forward_greedy


def test_generate_from_checkpoint(tmp_path, capsys):
  config = Config(model=DENSE)
  mesh, plan = build_mesh(MeshConfig(dp=2, tp=2), jax.devices()[:4])   # trained on a 4-device mesh
  mdef = model_def(DENSE)
  tx = make_optimizer(config.train)
  state = init_state(mdef, tx, state_shardings(mdef, tx, mesh, plan), seed=3)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(0, state, {}, config)
  ckpt.close()
  tok = load_tokenizer("byte")
  prompt = "abcabc"
  want = full_forward_greedy(DENSE, [tok.encode(prompt)], 5, params=jax.device_get(state.params))[0]
  serve.main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", prompt, "--max-tokens", "5",
              "--page-size", "8"])
  out = capsys.readouterr().out
  assert prompt + tok.decode(want) in out
