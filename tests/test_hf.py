"""Hugging Face import/export against `transformers` as the outside oracle for the model.

For each of the six families a tiny checkpoint is built offline from a config, every weight is
re-randomised (default init has zero biases, unit norms and tiny matrices, which hide layout bugs)
so logits are O(10), and saved with save_pretrained. Checks: logits equal transformers' (fp32,
max |diff| <= 1e-4 * max(1, max |logit|)), greedy decoding with the KV cache equals
transformers.generate token for token, export -> import is bitwise and the export loads in
transformers with the same logits, and loading onto the 8-device mesh (tp, and ep for MoE) gives
the single-device logits.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import MeshConfig
from jaxllm.io import export_hf, hf_chat_template, hf_to_model_config, hf_tokenizer_path, load_hf, load_hf_config
from jaxllm.model import KVCache
from jaxllm.model.hooks import using
from jaxllm.model.params import model_def

torch = pytest.importorskip("torch", reason="HF equivalence tests need CPU torch: pip install torch==2.13.0")
transformers = pytest.importorskip("transformers", reason="HF equivalence tests need transformers")

TOL = 1e-4   # relative to the logit scale (max |logit|), fp32 on both sides
COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
FAMILIES = {
  # llama3 RoPE scaling (all three frequency bands: wavelengths 6.3, 19.9, 62.8.. vs 32/4, 32/1) + tied embeddings
  "llama": dict(tie_word_embeddings=True, rope_parameters=dict(
    rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=32)),
  "qwen2": dict(),                     # q/k/v bias; saved sharded (index file)
  "qwen3": dict(head_dim=16),          # q/k norm
  "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
  "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=48, norm_topk_prob=False),
  # saved in transformers-5's fused expert layout (experts.gate_up_proj), with norm_topk_prob
  "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                    norm_topk_prob=True),
}
MESHES = {False: MeshConfig(dp=4, tp=2), True: MeshConfig(dp=4, tp=2, ep=4)}


def _randomise(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name:
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.5 * noise)
      else:
        p.copy_((0.5 if "embed" in name or "lm_head" in name else 0.25) * noise)


def _hf_model(family, path, seed=0, **save_kw):
  cfg = transformers.AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  _randomise(model, seed)
  model.save_pretrained(path, **save_kw)
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def _close(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  scale = max(1.0, float(np.abs(ref).max()))
  err = float(np.abs(ours - ref).max())
  assert err <= TOL * scale, f"max |diff| {err:.3g} > {TOL} * logit scale {scale:.3g}"
  return err / scale


def _forward(cfg, params, tokens):
  mdef = model_def(cfg)
  return jax.jit(lambda p, t: mdef.bind(p)(t).logits)(params, tokens)


TOKENS = np.random.RandomState(0).randint(0, 256, size=(4, 10)).astype(np.int32)


@pytest.fixture(scope="module", params=list(FAMILIES))
def ckpt(request, tmp_path_factory):
  family = request.param
  path = str(tmp_path_factory.mktemp(family))
  save_kw = {"qwen2": dict(max_shard_size="100KB"), "qwen3_moe": dict(save_original_format=False)}
  model = _hf_model(family, path, **save_kw.get(family, {}))
  cfg, params = load_hf(path)
  logits = _forward(cfg, params, TOKENS)
  return dict(family=family, path=path, model=model, cfg=cfg, params=params, logits=logits)


def test_layout_exercised(ckpt):
  files = os.listdir(ckpt["path"])
  if ckpt["family"] == "qwen2":
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
  if ckpt["family"] == "qwen3_moe":
    from safetensors import safe_open
    with safe_open(os.path.join(ckpt["path"], "model.safetensors"), "np") as f:
      assert any(k.endswith("experts.gate_up_proj") for k in f.keys())


def test_logits_match_transformers(ckpt):
  ref = _hf_logits(ckpt["model"], TOKENS)
  assert np.abs(ref).max() > 5.0, "re-randomised weights should give large logits"
  _close(ckpt["logits"], ref)


def test_greedy_matches_generate(ckpt):
  cfg, params, new = ckpt["cfg"], ckpt["params"], 8
  prompt = TOKENS[:2, :6]
  with torch.no_grad():
    ref = ckpt["model"].generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                                 do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
  ref = ref.numpy()[:, prompt.shape[1]:]
  mdef = model_def(cfg)

  @jax.jit
  def step(p, tokens, cache):
    out = mdef.bind(p)(tokens, cache=cache)
    return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache

  cache = KVCache.init(cfg, prompt.shape[0], prompt.shape[1] + new)
  tok, cache = step(params, jnp.asarray(prompt), cache)
  got = [tok]
  for _ in range(new - 1):
    tok, cache = step(params, tok[:, None], cache)
    got.append(tok)
  np.testing.assert_array_equal(np.stack(got, axis=1), ref)


def test_export_roundtrip(ckpt, tmp_path):
  cfg, params = ckpt["cfg"], ckpt["params"]
  out = export_hf(params, cfg, str(tmp_path / "export"), tokenizer_dir=ckpt["path"],
                  max_shard_bytes=150_000 if ckpt["family"] == "llama" else None)
  cfg2, params2 = load_hf(out)
  assert dataclasses.replace(cfg2, name="") == dataclasses.replace(cfg, name="")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params2)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path
  assert jax.tree.structure(params) == jax.tree.structure(params2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), _hf_logits(ckpt["model"], TOKENS), rtol=0, atol=1e-5)


def test_sharded_load_matches_single_device(ckpt):
  from jaxllm.parallel import build_mesh, mesh_hooks
  from jaxllm.train.state import param_shardings
  cfg = load_hf_config(ckpt["path"])
  mesh, plan = build_mesh(MESHES[cfg.is_moe])
  shardings = param_shardings(model_def(cfg), mesh, plan)
  cfg2, params = load_hf(ckpt["path"], shardings=shardings)
  for a, sh in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert a.sharding == sh
  assert any(not a.sharding.is_fully_replicated for a in jax.tree.leaves(params))
  mdef = model_def(cfg2)
  with jax.set_mesh(mesh), using(**mesh_hooks(mesh, plan, cfg2)):
    logits = jax.jit(lambda p, t: mdef.bind(p)(t).logits)(params, jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ckpt["logits"]), rtol=0,
                             atol=1e-5 * float(np.abs(ckpt["logits"]).max()))
