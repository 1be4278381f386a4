"""The LM loss without full logits (model.loss_chunk) and the per-layer remat policies (model.remat):
chunked == plain in values and gradients (single device and on a dp x tp mesh), its compiled temp
memory does not grow with B*T*V, and every remat policy gives the gradients of no remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import sharded_grads

from jaxllm.config import REMAT_POLICIES, ConfigError, MeshConfig, ModelConfig
from jaxllm.model.loss import chunked_cross_entropy_sums, cross_entropy_sums
from jaxllm.model.params import init_params, model_def
from jaxllm.train.step import grads_and_metrics

TINY = ModelConfig(name="t", vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


def _plain(h, w, t, m):
  logits = jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
  return cross_entropy_sums(logits, t, m)


def _loss_and_grads(fn, h, w, t, m):
  def f(h, w):
    total, count = fn(h, w, t, m)
    return total / count, (total, count)

  (_, (total, count)), (gh, gw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)
  return total, count, gh, gw


@pytest.mark.parametrize("chunk,masked", [(5, True), (4, False), (32, True)])
def test_chunked_loss_and_grads_equal_plain(chunk, masked):
  B, T, D, V = 3, 13, 16, 37  # T % 5 != 0 (padded chunk); 32 >= T: the plain path
  ks = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(ks[0], (B, T, D))
  w = jax.random.normal(ks[1], (D, V)) * 0.3
  t = jax.random.randint(ks[2], (B, T), 0, V)
  m = (jax.random.uniform(ks[3], (B, T)) > 0.3).astype(jnp.int32) if masked else None
  ref = _loss_and_grads(_plain, h, w, t, m)
  got = _loss_and_grads(lambda *a: chunked_cross_entropy_sums(*a, chunk=chunk), h, w, t, m)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Not differentiated (eval): the forward-only scan.
  total, count = jax.jit(lambda h, w: chunked_cross_entropy_sums(h, w, t, m, chunk))(h, w)
  np.testing.assert_allclose((total, count), ref[:2], rtol=1e-5)


def _batch(B=8, T=24, V=259, seed=0, masked=True):
  rng = np.random.default_rng(seed)
  b = {k: jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32) for k in ("inputs", "targets")}
  if masked:
    b["mask"] = jnp.asarray(rng.random((B, T)) > 0.25, jnp.int32)
  return b


def _grads(cfg, batch, mesh_cfg=None):
  mdef, params = model_def(cfg), init_params(cfg, 0)
  if mesh_cfg is None:
    return jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, batch)
  return sharded_grads(cfg, mesh_cfg, params, batch)


@pytest.mark.parametrize("tied", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_train_step_grads_chunked_equal_plain_single_and_mesh(tied):
  # T=24 in chunks of 7 (4 chunks, the last padded); dp=4 splits the rows, tp=2 the vocab and heads.
  # (Chunked on one device == plain is test_chunked_loss_and_grads_equal_plain; here it runs in the
  # default selection only on the mesh, to keep the compile count down.)
  base = dataclasses.replace(TINY, tie_embeddings=tied)
  batch = _batch()
  ref_g, ref_m = _grads(dataclasses.replace(base, loss_chunk=0), batch)
  for mesh_cfg in ((None,) if tied else ()) + (MeshConfig(dp=4, tp=2),):
    g, m = _grads(dataclasses.replace(base, loss_chunk=7), batch, mesh_cfg)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, ref_g)


def _temp_bytes(B, T, V, chunk, D=64):
  def f(h, w, t):
    total, count = chunked_cross_entropy_sums(h, w, t, None, chunk)
    return total / count

  args = (
    jax.ShapeDtypeStruct((B, T, D), jnp.float32),
    jax.ShapeDtypeStruct((D, V), jnp.float32),
    jax.ShapeDtypeStruct((B, T), jnp.int32),
  )
  return jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_memory_does_not_grow_with_tokens_times_vocab():
  B, T, V, C = 1, 2048, 32768, 128
  full_logits = B * T * V * 4  # 256 MiB of fp32 logits
  plain = _temp_bytes(B, T, V, 0)
  chunked = _temp_bytes(B, T, V, C)
  assert plain >= full_logits  # the plain loss holds [B, T, V] (and its gradient)
  assert chunked < plain / 8, (chunked, plain)
  # Four times the tokens: the chunked temp grows by the per-token D-sized buffers only, not by T*V.
  assert _temp_bytes(B, 4 * T, V, C) < chunked + 4 * T * V * 4 // 16


@pytest.fixture(scope="module")
def no_remat():
  batch = _batch(B=2, T=8, masked=False)
  return batch, _grads(TINY, batch)


# dots and dots_with_no_batch_dims are one jax policy under two names: one of them runs by default.
@pytest.mark.parametrize(
  "policy",
  [pytest.param(p, marks=pytest.mark.slow) if p in ("dots", "full") else p for p in REMAT_POLICIES if p != "none"],
)
def test_remat_policies_give_the_grads_of_no_remat(policy, no_remat):
  batch, (ref_g, ref_m) = no_remat
  g, m = _grads(dataclasses.replace(TINY, remat=policy, scan_unroll=2), batch)
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, ref_g)


def test_scan_unroll_auto_unrolls_training_on_cpu_and_gives_the_scanned_grads(no_remat):
  from jaxllm.model.transformer import scan_unroll

  stacked = {"w": jnp.zeros((TINY.n_layers, 3))}
  assert TINY.scan_unroll == 0 and scan_unroll(TINY, stacked) == TINY.n_layers  # the CPU test platform
  assert scan_unroll(TINY, stacked, cache=object()) == 1  # serving: one per step
  assert scan_unroll(dataclasses.replace(TINY, scan_unroll=1), stacked) == 1
  batch, (ref_g, ref_m) = no_remat  # auto: unrolled
  g, m = _grads(dataclasses.replace(TINY, scan_unroll=1), batch)  # a scan of one layer per step
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, ref_g)


def test_bad_remat_and_chunk_settings_are_config_errors():
  with pytest.raises(ConfigError, match="dots_saveable"):
    dataclasses.replace(TINY, remat="everything")
  with pytest.raises(ConfigError, match="loss_chunk"):
    dataclasses.replace(TINY, loss_chunk=-1)
  with pytest.raises(ConfigError, match="scan_unroll"):
    dataclasses.replace(TINY, scan_unroll=-1)
