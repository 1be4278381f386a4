"""Training attention behind model.attention, and document masks: every path equals the naive one
(values and gradients, GQA, segment ids, T not a multiple of the block); the model's loss and
gradients with flash equal xla (one device and dp x tp); a document packed after another scores as
it does alone; the loader's segment ids / positions / loss mask; flash's compiled memory is linear."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import sharded_grads

from jaxllm.config import Config, ConfigError, MeshConfig, ModelConfig, TrainConfig
from jaxllm.data.loader import PackedBatches, document_fields, eval_batches
from jaxllm.model import attention as A
from jaxllm.model.loss import token_nll
from jaxllm.model.params import init_params, model_def
from jaxllm.train.step import grads_and_metrics

TINY = ModelConfig(name="t", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def _qkv(B, T, N, K, H, seed=0, docs=True):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(key, (B, T, n, H)) for key, n in zip(ks, (N, K, K)))
  seg = None
  if docs:  # ~4 documents per row, boundaries at random places (also inside blocks)
    seg = jnp.asarray(np.cumsum(np.random.default_rng(seed).random((B, T)) < 0.1, axis=1), jnp.int32)
  return q, k, v, seg, jax.random.normal(ks[3], (B, T, N, H))


def _value_and_grads(fn, q, k, v, w):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)


def _close(got, ref, tol=2e-5):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


PATHS = {
  "flash": lambda q, k, v, s: A.flash_attention(q, k, v, s, block_q=8, block_k=16),
  "flash_qk": lambda q, k, v, s: A.flash_attention(q, k, v, s, block_q=16, block_k=8),
  # three query blocks: straight-line block loops; without documents, blocks below the diagonal unmasked
  "flash_unrolled": lambda q, k, v, s: A.flash_attention(q, k, v, s, block_q=16, block_k=16),
  # the cudnn path's call (GQA, causal, document mask) run by XLA; cuDNN itself needs a GPU (below)
  "dot_product_attention": lambda q, k, v, s: A.cudnn_attention(q, k, v, s, implementation="xla"),
}


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
  "path,gqa,docs",
  [
    ("flash", True, True),
    ("dot_product_attention", True, True),
    ("flash_unrolled", True, False),
    ("flash_unrolled", False, True),
    ("flash_qk", True, True),
    pytest.param("flash", False, False, marks=_SLOW),
    pytest.param("flash", True, False, marks=_SLOW),
    pytest.param("dot_product_attention", False, False, marks=_SLOW),
  ],
)
def test_paths_equal_naive_values_and_grads(path, gqa, docs):
  q, k, v, seg, w = _qkv(2, 37, 4, 2 if gqa else 4, 8, docs=docs)  # 37: not a multiple of any block
  ref = _value_and_grads(lambda q, k, v: A.self_attention("xla", q, k, v, seg), q, k, v, w)
  _close(_value_and_grads(lambda q, k, v: PATHS[path](q, k, v, seg), q, k, v, w), ref)


def test_flash_inside_shard_map_with_vma_checks():
  # The pipeline and manual TP run attention per device in a shard_map with check_vma=True: the
  # blockwise loops' carries must take the inputs' varying type.
  from jax.sharding import PartitionSpec as P

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("dp",))
  q, k, v, seg, w = _qkv(4, 37, 4, 2, 8)
  flash = jax.shard_map(
    lambda *a: A.flash_attention(*a, block_q=8, block_k=16),
    mesh=mesh,
    in_specs=(P("dp"),) * 4,
    out_specs=P("dp"),
    check_vma=True,
  )
  ref = _value_and_grads(lambda q, k, v: A.self_attention("xla", q, k, v, seg), q, k, v, w)
  _close(_value_and_grads(lambda q, k, v: flash(q, k, v, seg), q, k, v, w), ref)


@pytest.mark.slow
def test_flash_keeps_dtype_and_bf16_is_close():
  q, k, v, seg, _ = _qkv(1, 40, 4, 2, 16)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = jax.jit(lambda *a: A.flash_attention(*a, block_q=16, block_k=16))(qb, kb, vb, seg)
  assert out.dtype == jnp.bfloat16
  ref = A.self_attention("xla", q, k, v, seg)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)


def test_cudnn_on_gpu():
  if jax.devices()[0].platform != "gpu":
    pytest.skip("cuDNN attention needs a GPU (its call is checked on CPU through implementation='xla')")
  q, k, v, seg, w = _qkv(2, 64, 4, 2, 64)
  bf = lambda x: x.astype(jnp.bfloat16)
  for s in (None, seg):
    got = _value_and_grads(
      lambda q, k, v: A.self_attention("cudnn", q, k, v, s).astype(jnp.float32), bf(q), bf(k), bf(v), w
    )
    ref = _value_and_grads(
      lambda q, k, v: A.self_attention("xla", q, k, v, s).astype(jnp.float32), bf(q), bf(k), bf(v), w
    )
    _close(got, ref, tol=5e-2)


@pytest.mark.slow
def test_splash_interpret_equals_naive():
  # The TPU kernel in the Pallas interpreter (slow on CPU): T=128 is its smallest block.
  q, k, v, seg, w = _qkv(1, 128, 4, 2, 8)
  for s in (None, seg):
    ref = _value_and_grads(lambda q, k, v: A.self_attention("xla", q, k, v, s), q, k, v, w)
    got = _value_and_grads(lambda q, k, v: A.splash_attention(q, k, v, s, interpret=True), q, k, v, w)
    _close(got, ref, tol=1e-4)


def test_auto_and_config_choices():
  q = jnp.zeros((1, 8, 4, 8))
  assert A.resolve("auto", q) == "flash"  # the CPU test platform
  assert A.resolve("xla", q) == "xla"
  with pytest.raises(ConfigError, match="'flash'.*'cudnn'.*'splash'|flash, cudnn, splash"):
    ModelConfig(attention="fast")
  with pytest.raises(ValueError, match="bf16"):
    A.cudnn_attention(q, q[:, :, :2], q[:, :, :2])
  with pytest.raises(ConfigError, match="document_masks"):
    TrainConfig(reset_positions=True)
  with pytest.raises(ConfigError, match="pipeline"):
    Config(mesh=MeshConfig(pp=2, microbatches=2), train=TrainConfig(document_masks=True))


# ---------------------------------------------------------------------------------------------
# The model: flash == xla in loss and gradients, with document masks, single device and dp x tp


def _doc_batch(B=8, T=40, V=64, seed=0, reset=True):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, V, (B, T))
  inputs[rng.random((B, T)) < 0.08] = 0  # eos = 0
  b = {"inputs": inputs, "targets": rng.integers(0, V, (B, T)), **document_fields(inputs, 0, reset)}
  return {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}


def _grads(cfg, batch, mesh_cfg=None):
  mdef, params = model_def(cfg), init_params(cfg, 0)
  if mesh_cfg is None:
    return jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, batch)
  return sharded_grads(cfg, mesh_cfg, params, batch)


@pytest.mark.parametrize(
  "mesh_cfg", [None, pytest.param(MeshConfig(dp=4, tp=2), marks=pytest.mark.slow)], ids=["one_device", "dp4_tp2"]
)
def test_model_flash_equals_xla(monkeypatch, mesh_cfg):
  monkeypatch.setattr(A, "BLOCK_Q", 16)  # T=40: three query blocks, the last one partial
  monkeypatch.setattr(A, "BLOCK_K", 8)
  cfg = dataclasses.replace(TINY, n_layers=1)
  batch = _doc_batch()
  ref_g, ref_m = _grads(dataclasses.replace(cfg, attention="xla"), batch)
  if True:  # dp splits the rows, tp the heads
    g, m = _grads(dataclasses.replace(cfg, attention="flash"), batch, mesh_cfg)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, ref_g)


@pytest.mark.parametrize("attention", ["flash", pytest.param("xla", marks=pytest.mark.slow)])
def test_packed_document_scores_as_alone(attention):
  # The oracle: a document's per-token NLL packed after another (document masks, positions reset)
  # equals its NLL run alone, from a plain forward with nothing packed.
  cfg = dataclasses.replace(TINY, attention=attention)
  mdef, params = model_def(cfg), init_params(cfg, 0)
  fwd = jax.jit(lambda p, *a, segment_ids=None: mdef.bind(p)(*a, segment_ids=segment_ids).logits)
  model = lambda *a, segment_ids=None: fwd(params, *[jnp.asarray(x) for x in a], segment_ids=segment_ids)
  rng = np.random.default_rng(1)
  doc_a = np.append(rng.integers(1, 64, 13), 0)  # 13 tokens + eos
  doc_b = rng.integers(1, 64, 11)
  row = np.concatenate([doc_a, doc_b])[None]  # [1, 25]
  f = document_fields(row[:, :-1], 0, reset_positions=True)
  logits = model(row[:, :-1], f["positions"], segment_ids=jnp.asarray(f["segment_ids"]))
  packed = token_nll(logits, jnp.asarray(row[:, 1:]))[0, len(doc_a) :]
  alone = token_nll(model(doc_b[None, :-1]), jnp.asarray(doc_b[None, 1:]))[0]
  np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
  # the target that opens doc_b (input: doc_a's eos) is not scored
  assert f["mask"][0, len(doc_a) - 1] == 0 and f["mask"].sum() == row.shape[1] - 2


# ---------------------------------------------------------------------------------------------
# The loader


def test_loader_document_fields():
  stream = np.array([5, 6, 0, 7, 8, 9, 0, 0, 3, 4, 0, 1, 2], np.int32)
  b = next(PackedBatches(stream, 6, 2, shuffle=False, eos_id=0, reset_positions=True))
  np.testing.assert_array_equal(b["inputs"], [[5, 6, 0, 7, 8, 9], [0, 0, 3, 4, 0, 1]])
  np.testing.assert_array_equal(b["segment_ids"], [[0, 0, 0, 1, 1, 1], [0, 1, 2, 2, 2, 3]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 2, 0]])
  np.testing.assert_array_equal(b["mask"], [[1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 0, 1]])
  assert all(v.dtype == np.int32 and v.shape == (2, 6) for v in b.values())
  # eval batches carry the same keys; without eos_id neither has the document fields
  ev = eval_batches(stream, 6, 2, 1, eos_id=0, reset_positions=True)[0]
  assert sorted(ev) == sorted(b)
  assert sorted(next(PackedBatches(stream, 6, 2))) == sorted(eval_batches(stream, 6, 2, 1)[0]) == ["inputs", "targets"]
  assert "positions" not in next(PackedBatches(stream, 6, 2, eos_id=0))
  with pytest.raises(ValueError, match="eos_id"):
    PackedBatches(stream, 6, 2, reset_positions=True)


# ---------------------------------------------------------------------------------------------
# Memory (compiled, never run)


def _temp_bytes(impl, T):
  q, k, v = (jax.ShapeDtypeStruct((1, T, n, 32), jnp.float32) for n in (4, 2, 2))
  seg = jax.ShapeDtypeStruct((1, T), jnp.int32)
  f = jax.grad(lambda q, k, v, s: jnp.sum(A.self_attention(impl, q, k, v, s)), argnums=(0, 1, 2))
  return jax.jit(f).lower(q, k, v, seg).compile().memory_analysis().temp_size_in_bytes


def test_flash_memory_linear_in_T():
  flash = _temp_bytes("flash", 4096) / _temp_bytes("flash", 512)
  xla = _temp_bytes("xla", 4096) / _temp_bytes("xla", 512)
  assert flash <= 12, flash  # 8x the tokens
  assert xla >= 30, xla  # the [T, T] scores and mask (~64x, less the linear terms)


@pytest.mark.slow
def test_training_run_with_document_masks(tmp_path):
  # The loop end to end on the 8-device mesh: document fields from the loader through global_batch
  # into the train and eval steps; short documents so every row holds several.
  import os

  from jaxllm.config import load_config
  from jaxllm.train.loop import train

  docs = tmp_path / "docs.jsonl"
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "eps"]
  docs.write_text("".join('{"text": "%s"}\n' % " ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(400)))
  cfg = load_config(
    [],
    [
      f"mesh={os.path.join(os.path.dirname(__file__), '..', '..', 'meshes', 'cpu-8.toml')}",
      "model=tiny",
      "model.n_layers=1",
      "model.d_model=64",
      "model.d_ff=128",
      "model.attention=flash",
      "train.seq_len=64",
      "train.batch_size=8",
      f"train.data={docs}",
      "train.steps=4",
      "train.eval_every=2",
      "train.eval_batches=1",
      "train.document_masks=true",
      "train.reset_positions=true",
      "train.sample_tokens=0",
      "train.log_every=2",
      f"train.out_dir={tmp_path / 'run'}",
    ],
  )
  out = train(cfg, progress=False, log=lambda *_: None)
  assert out["steps"] == 4 and np.isfinite(out["last_loss"]) and np.isfinite(out["eval_loss"])
