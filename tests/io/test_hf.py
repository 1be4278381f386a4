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

TOL = 1e-4  # relative to the logit scale (max |logit|), fp32 on both sides
COMMON = dict(
  vocab_size=256,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  intermediate_size=96,
  max_position_embeddings=128,
  bos_token_id=None,
  eos_token_id=None,
  pad_token_id=None,
)
FAMILIES = {
  # llama3 RoPE scaling (all three frequency bands: wavelengths 6.3, 19.9, 62.8.. vs 32/4, 32/1) + tied embeddings
  "llama": dict(
    tie_word_embeddings=True,
    rope_parameters=dict(
      rope_type="llama3",
      rope_theta=10000.0,
      factor=4.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=32,
    ),
  ),
  "qwen2": dict(),  # q/k/v bias; saved sharded (index file)
  "qwen3": dict(head_dim=16),  # q/k norm
  "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
  "qwen2_moe": dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    norm_topk_prob=False,
  ),
  # saved in transformers-5's fused expert layout (experts.gate_up_proj), with norm_topk_prob
  "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True),
}
# tied vocab-sharded embeddings (llama), shared expert + ep (qwen2_moe), fused expert slices + ep (qwen3_moe)
MESH_FAMILIES = ("llama", "qwen2_moe", "qwen3_moe")
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
  rel = _close(ckpt["logits"], ref)
  print(f"{ckpt['family']}: max |logit| {np.abs(ref).max():.1f}, max |diff| / scale {rel:.2e}")


def test_greedy_matches_generate(ckpt):
  cfg, params, new = ckpt["cfg"], ckpt["params"], 8
  prompt = TOKENS[:2, :6]
  with torch.no_grad():
    ref = ckpt["model"].generate(
      torch.tensor(prompt),
      attention_mask=torch.ones(prompt.shape, dtype=torch.long),
      do_sample=False,
      max_new_tokens=new,
      min_new_tokens=new,
      pad_token_id=0,
    )
  ref = ref.numpy()[:, prompt.shape[1] :]
  mdef = model_def(cfg)

  @jax.jit
  def step(p, tokens, cache):
    out = mdef.bind(p)(tokens, cache=cache)
    return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache

  # The prompt goes through the cache one token at a time too: one compiled step shape (T=1).
  cache = KVCache.init(cfg, prompt.shape[0], prompt.shape[1] + new)
  for t in range(prompt.shape[1]):
    tok, cache = step(params, jnp.asarray(prompt[:, t : t + 1]), cache)
  got = [tok]
  for _ in range(new - 1):
    tok, cache = step(params, tok[:, None], cache)
    got.append(tok)
  np.testing.assert_array_equal(np.stack(got, axis=1), ref)


def test_export_roundtrip(ckpt, tmp_path):
  cfg, params = ckpt["cfg"], ckpt["params"]
  out = export_hf(
    params,
    cfg,
    str(tmp_path / "export"),
    tokenizer_dir=ckpt["path"],
    max_shard_bytes=150_000 if ckpt["family"] == "llama" else None,
  )
  cfg2, params2 = load_hf(out)
  assert dataclasses.replace(cfg2, name="") == dataclasses.replace(cfg, name="")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params2)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path
  assert jax.tree.structure(params) == jax.tree.structure(params2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), _hf_logits(ckpt["model"], TOKENS), rtol=0, atol=1e-5)


def test_sharded_load_matches_single_device(ckpt):
  if ckpt["family"] not in MESH_FAMILIES:
    pytest.skip("mesh loading is covered by " + ", ".join(MESH_FAMILIES) + " (keeps the file fast)")
  from jaxllm.parallel import build_mesh, mesh_hooks, param_shardings

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
  np.testing.assert_allclose(
    np.asarray(logits), np.asarray(ckpt["logits"]), rtol=0, atol=1e-5 * float(np.abs(ckpt["logits"]).max())
  )


def test_fused_and_per_expert_files_load_identically(tmp_path):
  model = _hf_model("mixtral", str(tmp_path / "per_expert"))
  model.save_pretrained(str(tmp_path / "fused"), save_original_format=False)
  cfg_a, a = load_hf(str(tmp_path / "per_expert"))
  cfg_b, b = load_hf(str(tmp_path / "fused"))
  assert cfg_a == cfg_b
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# Config spellings and rejections (no weights needed)

BASE = dict(
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  intermediate_size=96,
  vocab_size=256,
  max_position_embeddings=128,
  rms_norm_eps=1e-6,
)


def test_config_old_and_new_spellings_agree():
  rope = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
  )
  new = hf_to_model_config(
    {
      **BASE,
      "architectures": ["LlamaForCausalLM"],
      "dtype": "bfloat16",
      "head_dim": None,
      "rope_parameters": {**rope, "rope_theta": 5e5},
    }
  )
  old = hf_to_model_config(
    {
      **BASE,
      "architectures": ["LlamaForCausalLM"],
      "torch_dtype": "bfloat16",
      "rope_theta": 5e5,
      "rope_scaling": {**rope, "type": rope["rope_type"]},
    }
  )
  assert new == old
  assert (new.rope_scaling, new.rope_factor, new.rope_original_max_pos, new.rope_theta) == ("llama3", 8.0, 64, 5e5)
  assert new.resolved_head_dim == 16 and new.param_dtype == "bfloat16"
  moe = dict(BASE, architectures=["Qwen3MoeForCausalLM"], moe_intermediate_size=32, head_dim=32, norm_topk_prob=True)
  a = hf_to_model_config({**moe, "num_experts": 8})
  b = hf_to_model_config({**moe, "num_local_experts": 8})
  assert a == b and a.n_experts == 8 and a.resolved_head_dim == 32 and a.moe_renormalize and a.qk_norm
  q2 = hf_to_model_config(
    dict(
      BASE,
      architectures=["Qwen2MoeForCausalLM"],
      num_experts=4,
      moe_intermediate_size=32,
      shared_expert_intermediate_size=48,
    )
  )
  assert q2.qkv_bias and q2.shared_expert_gate and q2.shared_expert_d_ff == 48 and not q2.moe_renormalize
  mix = hf_to_model_config(dict(BASE, architectures=["MixtralForCausalLM"], num_local_experts=4))
  assert mix.moe_renormalize and mix.resolved_moe_d_ff == 96 and mix.rope_theta == 1e6


@pytest.mark.parametrize(
  "arch,extra,needle",
  [
    ("GPT2LMHeadModel", {}, "LlamaForCausalLM, Qwen2ForCausalLM"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True}, "sliding-window"),
    (
      "Qwen3MoeForCausalLM",
      {"num_experts": 4, "moe_intermediate_size": 8, "decoder_sparse_step": 2},
      "decoder_sparse_step",
    ),
    (
      "Qwen2MoeForCausalLM",
      {"num_experts": 4, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8, "mlp_only_layers": [0]},
      "mlp_only_layers",
    ),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ("LlamaForCausalLM", {"attention_bias": True}, "attention_bias"),
    ("MixtralForCausalLM", {"num_local_experts": 4, "sliding_window": 16}, "sliding_window"),
  ],
)
def test_config_rejects_unsupported(arch, extra, needle):
  with pytest.raises(ValueError, match=needle):
    hf_to_model_config({**BASE, "architectures": [arch], **extra})


def test_export_rejects_unrepresentable_architecture(tmp_path):
  cfg = hf_to_model_config(dict(BASE, architectures=["Qwen2ForCausalLM"]))
  with pytest.raises(ValueError, match="qkv_bias"):
    export_hf({}, cfg, str(tmp_path), architecture="LlamaForCausalLM")


# ---------------------------------------------------------------------------------------------
# Broken directories: every problem named, nothing loaded


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  with open(src / "tokenizer.json", "w") as f:
    f.write('{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}')
  with open(src / "tokenizer_config.json", "w") as f:
    json.dump({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}, f)
  cfg = hf_to_model_config(dict(BASE, architectures=["Qwen3ForCausalLM"]))
  rng = np.random.RandomState(0)  # host arrays: no jax work needed to make a valid directory
  params = jax.tree.map(lambda a: rng.randn(*a.shape).astype(a.dtype), model_def(cfg).abstract_params())
  return export_hf(params, cfg, str(tmp_path_factory.mktemp("small")), tokenizer_dir=str(src))


def test_tokenizer_files_travel(small_dir):
  assert hf_tokenizer_path(small_dir) == os.path.join(small_dir, "tokenizer.json")
  assert hf_chat_template(small_dir).startswith("{% for m in messages %}")


def _rewrite(small_dir, tmp_path, edit):
  from safetensors.numpy import load_file, save_file

  out = tmp_path / "broken"
  shutil.copytree(small_dir, out)
  tensors = load_file(str(out / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  return str(out)


@pytest.mark.parametrize(
  "edit,needle",
  [
    (
      lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"),
      r"missing tensors \(1\): model.layers.1.self_attn.k_norm",
    ),
    (
      lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}),
      r"model.layers.0.mlp.up_proj.weight has shape \[95, 64\], expected \[96, 64\]",
    ),
    (
      lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2,), np.float32)}),
      r"unused tensors \(1\): model.layers.0.mlp.extra.weight",
    ),
  ],
)
def test_broken_weights_are_named(small_dir, tmp_path, edit, needle):
  with pytest.raises(ValueError, match=needle):
    load_hf(_rewrite(small_dir, tmp_path, edit))


def test_unknown_architecture_dir(small_dir, tmp_path):
  out = tmp_path / "gpt2"
  shutil.copytree(small_dir, out)
  hf = json.load(open(out / "config.json"))
  hf.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  json.dump(hf, open(out / "config.json", "w"))
  with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*Qwen3MoeForCausalLM"):
    load_hf(str(out))


def test_bfloat16_roundtrip_and_run_config(tmp_path):
  cfg = hf_to_model_config(dict(BASE, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16"))
  assert cfg.param_dtype == "bfloat16"
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda a: rng.randn(*a.shape).astype(a.dtype), model_def(cfg).abstract_params())
  out = export_hf(params, cfg, str(tmp_path / "bf16"))
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  cfg2, params2 = load_hf(out)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert b.dtype == jnp.bfloat16 and np.array_equal(np.asarray(a), np.asarray(b))
  # a run config may change dtypes (bf16 -> fp32 is exact) but not the shapes
  run = dataclasses.replace(cfg2, param_dtype="float32", remat="full")
  cfg3, params3 = load_hf(out, cfg=run)
  assert cfg3 == run and all(x.dtype == jnp.float32 for x in jax.tree.leaves(params3))
  with pytest.raises(ValueError, match="d_ff: run 100"):
    load_hf(out, cfg=dataclasses.replace(cfg2, d_ff=100))
