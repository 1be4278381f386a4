"""MoE Parallel Folding on the 8-device CPU mesh: for a grid of (dp, tp | ep, etp) foldings the loss
and every gradient of a small tiny-moe equal the single-device run; parameters live where the rank
table says; the compiled step has all-to-all exactly when ep > 1; the capacity mode drops exactly
the slots past capacity. fp32 with jax_default_matmul_precision=highest (conftest)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError, MeshConfig, ModelConfig
from jaxllm.model import hooks
from jaxllm.model.moe import local_experts
from jaxllm.model.params import init_params, model_def
from jaxllm.parallel import build_mesh, expert_parallel, mesh_hooks
from jaxllm.parallel.mesh import rank_table
from jaxllm.parallel.sharding import batch_sharding, param_shardings
from jaxllm.train.step import grads_and_metrics

# Loss: relative 1e-6. Gradients: |g - g_ref| <= ATOL + RTOL * |g_ref| elementwise, where ATOL is
# 1e-6 times the largest |g_ref| of that parameter (sums over devices reassociate fp32 adds).
RTOL, ATOL_REL = 1e-5, 1e-6
FAST = {"xla_backend_optimization_level": 0}  # these tests check numerics, not speed: compile fast

CFG = ModelConfig(
  name="tiny-moe-test",
  vocab_size=256,
  d_model=64,
  n_layers=2,
  n_heads=8,
  n_kv_heads=2,
  d_ff=128,
  n_experts=8,
  n_experts_per_tok=2,
  moe_d_ff=32,
  shared_expert_d_ff=32,
  shared_expert_gate=True,
)
B, T = 8, 16

#            dp tp  ep etp      (edp = dp*tp / (ep*etp))
FOLDINGS = [
  (4, 2, 8, 1),  # EP spans all of dp and tp
  (2, 4, 4, 2),  # ETP inside TP, EP over the rest
  (4, 2, 4, 1),  # edp=2: experts replicated twice, gradients summed over edp
  (8, 1, 2, 1),  # classic EP inside DP, edp=4
  (1, 8, 8, 1),  # pure TP for attention, pure EP for experts
  (2, 4, 2, 2),  # ep, etp and edp all 2
  (4, 2, 1, 1),
]  # no EP: per-device dispatch only, no all-to-all


@pytest.fixture(scope="module")
def setup():
  mdef = model_def(CFG)
  params = jax.jit(init_params, static_argnums=(0, 1))(CFG, 0)  # eager NNX init is slow on CPU
  tok = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
  f = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))
  ref = f.lower(params, batch).compile(compiler_options=FAST)(params, batch)
  return mdef, params, batch, ref


def _compiled_step(mdef, params, batch, mc: MeshConfig):
  mesh, plan = build_mesh(mc)
  hk = mesh_hooks(mesh, plan, CFG)
  p = jax.device_put(params, param_shardings(mdef, mesh, plan))
  b = jax.device_put(batch, batch_sharding(mesh, plan))

  def f(p, b):
    with hooks.using(**hk):
      return grads_and_metrics(mdef, p, b)

  return mesh, plan, p, b, jax.jit(f).lower(p, b).compile(compiler_options=FAST)


@pytest.mark.parametrize("dp,tp,ep,etp", FOLDINGS, ids=[f"tp{t}dp{d}-ep{e}etp{x}" for d, t, e, x in FOLDINGS])
def test_folding_matches_single_device(setup, dp, tp, ep, etp):
  mdef, params, batch, (ref_g, ref_m) = setup
  mesh, plan, p, b, step = _compiled_step(mdef, params, batch, MeshConfig(dp=dp, tp=tp, ep=ep, etp=etp))

  # The compiled HLO exchanges tokens with all-to-all exactly when experts are split.
  n_a2a = step.as_text().count("all-to-all(")
  assert (n_a2a > 0) == (ep > 1), f"{n_a2a} all-to-all ops in HLO for ep={ep}"

  # Parameters sit where the rank table says: experts over ep, expert hidden over etp, heads over tp.
  ranks = dict(rank_table(mesh, plan))
  El, Fl, Nl = CFG.n_experts // ep, CFG.resolved_moe_d_ff // etp, CFG.n_heads // tp
  for shard in p["layers"]["w_gate"].addressable_shards:  # [L, E, D, Fm]
    r = ranks[shard.device.id]
    assert _range(shard.index[1], CFG.n_experts) == (r["ep"] * El, (r["ep"] + 1) * El)
    assert _range(shard.index[3], CFG.resolved_moe_d_ff) == (r["etp"] * Fl, (r["etp"] + 1) * Fl)
  for shard in p["layers"]["w_down"].addressable_shards:  # [L, E, Fm, D]
    r = ranks[shard.device.id]
    assert _range(shard.index[1], CFG.n_experts) == (r["ep"] * El, (r["ep"] + 1) * El)
    assert _range(shard.index[2], CFG.resolved_moe_d_ff) == (r["etp"] * Fl, (r["etp"] + 1) * Fl)
  for shard in p["layers"]["wq"].addressable_shards:  # [L, D, N, H]
    r = ranks[shard.device.id]
    assert _range(shard.index[2], CFG.n_heads) == (r["tp"] * Nl, (r["tp"] + 1) * Nl)

  grads, metrics = step(p, b)
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_m["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["aux_loss"]), float(ref_m["aux_loss"]), rtol=1e-6)
  flat_g, flat_r = jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_g)
  for (path, g), r in zip(flat_g, flat_r):
    r = np.asarray(r)
    np.testing.assert_allclose(
      np.asarray(g),
      r,
      rtol=RTOL,
      atol=ATOL_REL * np.abs(r).max(),
      err_msg=f"gradient {jax.tree_util.keystr(path)} differs under {plan.cfg}",
    )


def _range(sl: slice, size: int) -> tuple[int, int]:
  return (sl.start or 0, size if sl.stop is None else sl.stop)


def _capacity_reference(x, ids, weights, w_gate, w_up, w_down, n_chunks, cf):
  """Local dropless experts with the router weight of every dropped slot zeroed: per token chunk
  (one per device), per expert, slots beyond cap = ceil(cf * slots / E) in token order are dropped."""
  Bx, Tx, _ = x.shape
  k, E = ids.shape[-1], w_gate.shape[0]
  ids_np = np.asarray(ids).reshape(n_chunks, -1)  # chunk c = global tokens c*m .. c*m+m-1
  cap = max(1, math.ceil(cf * ids_np.shape[1] / E))
  keep = np.zeros_like(ids_np, dtype=bool)
  for c in range(n_chunks):
    for e in range(E):
      where = np.flatnonzero(ids_np[c] == e)
      keep[c, where[:cap]] = True
  kept_w = weights * jnp.asarray(keep.reshape(Bx, Tx, k))
  return local_experts(x, ids, kept_w, w_gate, w_up, w_down), keep.mean()


@pytest.mark.parametrize("cf", [0.5, 100.0])
def test_capacity_factor_drops_exactly_the_overflow(cf):
  mesh, plan = build_mesh(MeshConfig(dp=4, tp=2, ep=4, etp=2))
  kx, ki, kw, k1, k2, k3 = jax.random.split(jax.random.key(1), 6)
  E, D, F, k = 8, 16, 8, 2
  x = jax.random.normal(kx, (B, T, D))
  # Skewed routing so that some experts overflow their capacity.
  ids = jnp.argsort(jax.random.uniform(ki, (B, T, E)) * jnp.arange(1, E + 1), axis=-1)[..., -k:]
  weights = jax.nn.softmax(jax.random.normal(kw, (B, T, k)), axis=-1)
  w = [jax.random.normal(kk, s) * 0.2 for kk, s in ((k1, (E, D, F)), (k2, (E, D, F)), (k3, (E, F, D)))]
  got = jax.jit(expert_parallel(mesh, plan, capacity_factor=cf))(x, ids, weights, *w)
  want, kept = _capacity_reference(x, ids, weights, *w, n_chunks=8, cf=cf)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert (kept < 1.0) == (cf < 1.0)
  if cf >= 100:  # capacity never binds: identical to the dropless path
    np.testing.assert_allclose(np.asarray(got), np.asarray(local_experts(x, ids, weights, *w)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dp,tp,ep,etp", [(4, 2, 8, 1), (2, 4, 4, 2)])
def test_dropless_under_worst_case_routing(dp, tp, ep, etp):
  """Every token picks experts 0 and 1 (all on one or two peers): the fixed-size buffers must still
  carry every slot, so the result equals the local dropless experts."""
  mesh, plan = build_mesh(MeshConfig(dp=dp, tp=tp, ep=ep, etp=etp))
  kx, kw, k1, k2, k3 = jax.random.split(jax.random.key(2), 5)
  E, D, F = 8, 16, 8
  x = jax.random.normal(kx, (B, T, D))
  ids = jnp.broadcast_to(jnp.array([1, 0], jnp.int32), (B, T, 2))
  weights = jax.nn.softmax(jax.random.normal(kw, (B, T, 2)), axis=-1)
  w = [jax.random.normal(kk, s) * 0.2 for kk, s in ((k1, (E, D, F)), (k2, (E, D, F)), (k3, (E, F, D)))]
  got = jax.jit(expert_parallel(mesh, plan))(x, ids, weights, *w)
  np.testing.assert_allclose(np.asarray(got), np.asarray(local_experts(x, ids, weights, *w)), rtol=1e-5, atol=1e-6)


def test_tokens_not_divisible_by_tp_rejected_before_compile():
  mesh, plan = build_mesh(MeshConfig(dp=2, tp=4, ep=4, etp=2))
  x = jnp.zeros((2, 3, 16))  # 1 batch row x 3 tokens per dp rank cannot split over tp=4
  ids = jnp.zeros((2, 3, 2), jnp.int32)
  w = jnp.zeros((8, 16, 8))
  with pytest.raises(ConfigError, match="divisible by tp=4"):
    jax.jit(expert_parallel(mesh, plan)).lower(x, ids, ids.astype(jnp.float32), w, w, w.transpose(0, 2, 1))
