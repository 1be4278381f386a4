"""The shared model: cached decode == full forward, MoE == per-token expert loop, param count."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MODEL_PRESETS, ModelConfig
from jaxllm.model import KVCache, Transformer
from jaxllm.model.moe import local_experts, route
from jaxllm.model.params import count_params, init_params, model_def

BASE = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, init_std=0.2)


def variants():
  yield "dense-gqa", BASE
  yield "dense-mha", dataclasses.replace(BASE, n_kv_heads=4)
  yield "dense-qwen", dataclasses.replace(BASE, qkv_bias=True, qk_norm=True, tie_embeddings=True,
                                          rope_scaling="llama3", rope_original_max_pos=16)
  yield "moe-gqa", dataclasses.replace(BASE, n_experts=4, n_experts_per_tok=2, moe_d_ff=32)
  yield "moe-mha-shared", dataclasses.replace(BASE, n_kv_heads=4, n_experts=4, n_experts_per_tok=2, moe_d_ff=32,
                                              shared_expert_d_ff=48, shared_expert_gate=True, moe_renormalize=False)


@pytest.mark.parametrize("name,cfg", list(variants()), ids=[n for n, _ in variants()])
def test_cached_decode_matches_full_forward(name, cfg):
  model = Transformer(cfg, nnx.Rngs(0))
  if cfg.qkv_bias:  # zero-init biases would hide a wrong bias path
    for n in ("bq", "bk", "bv"):
      getattr(model.layers, n)[...] = jax.random.normal(jax.random.key(1), getattr(model.layers, n).shape)
  tokens = jax.random.randint(jax.random.key(2), (3, 13), 0, cfg.vocab_size)
  full = model(tokens).logits
  cache = KVCache.init(cfg, 3, 20)
  pieces = []
  for lo, hi in [(0, 7), (7, 8), (8, 9), (9, 13)]:   # prefill, two single-token steps, a chunk
    out = model(tokens[:, lo:hi], cache=cache)
    cache = out.cache
    pieces.append(out.logits)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=2e-5, rtol=2e-5)
  assert np.asarray(cache.lengths).tolist() == [13, 13, 13]
  assert float(jnp.std(full)) > 0.1   # logits are not trivially small


def test_moe_matches_per_token_loop():
  cfg = dataclasses.replace(BASE, n_experts=6, n_experts_per_tok=3, moe_d_ff=16)
  rng = np.random.default_rng(0)
  B, T, D, E, F = 2, 5, cfg.d_model, cfg.n_experts, 16
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  w_router = jnp.asarray(rng.normal(size=(D, E)), jnp.float32)
  wg, wu = (jnp.asarray(rng.normal(size=(E, D, F)) * 0.2, jnp.float32) for _ in range(2))
  wd = jnp.asarray(rng.normal(size=(E, F, D)) * 0.2, jnp.float32)
  for renorm in (True, False):
    ids, weights, _ = route(x, w_router, 3, renorm)
    got = local_experts(x, ids, weights, wg, wu, wd)
    want = np.zeros((B, T, D), np.float32)
    probs = np.asarray(jax.nn.softmax(np.asarray(x) @ np.asarray(w_router), axis=-1))
    for b in range(B):
      for t in range(T):
        top = np.argsort(-probs[b, t])[:3]
        w = probs[b, t, top] / (probs[b, t, top].sum() if renorm else 1.0)
        for e, we in zip(top, w):
          h = np.asarray(jax.nn.silu(x[b, t] @ wg[e])) * np.asarray(x[b, t] @ wu[e])
          want[b, t] += we * (h @ np.asarray(wd[e]))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_aux_losses_uniform_router():
  # A router with all-equal logits gives load_balance == 1 (perfectly balanced by definition).
  x = jnp.ones((1, 8, 4))
  ids, w, aux = route(x, jnp.zeros((4, 4)), 4, True)
  assert abs(float(aux["load_balance"]) - 1.0) < 1e-6
  assert abs(float(aux["router_z"]) - np.log(4) ** 2) < 1e-5


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "small", "llama-3.2-1b", "qwen3-30b-a3b"])
def test_param_count_matches_formula(preset):
  cfg = MODEL_PRESETS[preset]
  abstract = model_def(cfg).abstract_params()
  assert count_params(abstract) == cfg.param_counts()["total"]


def test_presets_sizes():
  assert 80e6 < MODEL_PRESETS["small"].param_counts()["total"] < 130e6
  assert 1.1e9 < MODEL_PRESETS["llama-3.2-1b"].param_counts()["total"] < 1.3e9
  q = MODEL_PRESETS["qwen3-30b-a3b"].param_counts()
  assert 29e9 < q["total"] < 32e9 and 3.0e9 < q["active"] < 3.6e9


def test_bf16_compute_with_fp32_params_is_close():
  cfg = dataclasses.replace(BASE, dtype="bfloat16")
  params = init_params(BASE, 0)
  tokens = jnp.arange(12).reshape(2, 6) % BASE.vocab_size
  f32 = model_def(BASE).bind(params)(tokens).logits
  bf = model_def(cfg).bind(params)(tokens).logits
  assert bf.dtype == jnp.float32 and model_def(cfg).bind(params).embed[...].dtype == jnp.float32
  np.testing.assert_allclose(bf, f32, atol=0.15, rtol=0.05)


def test_logical_names_on_every_param():
  mdef = model_def(MODEL_PRESETS["tiny-moe"])
  shapes = mdef.abstract_params()
  flat = jax.tree_util.tree_leaves_with_path(mdef.logical, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat) == len(jax.tree.leaves(shapes))
  for (path, names), leaf in zip(flat, jax.tree.leaves(shapes)):
    assert len(names) == leaf.ndim, path
