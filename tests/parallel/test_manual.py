"""Manual tensor parallelism (jaxllm.parallel.manual): embedding, decoder blocks, final norm and the
vocab-parallel loss inside one shard_map manual over every mesh axis give the loss, MoE aux losses
and every gradient (taken outside the shard_map) of the plain single-device model: GQA with kv heads
split or sliced, biases + qk-norm + tied embeddings, a vocab tp does not divide, MoE with folding.
fp32 with jax_default_matmul_precision=highest (conftest)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import ConfigError, MeshConfig, ModelConfig
from jaxllm.model import hooks
from jaxllm.model import layers as ops
from jaxllm.model.loss import cross_entropy_sums
from jaxllm.model.params import init_params, model_def
from jaxllm.model.transformer import aux_loss, block_forward
from jaxllm.model.varying import vary, varying_axes
from jaxllm.parallel import mesh_hooks
from jaxllm.parallel.manual import check_manual, localize_layer_params, manual, vocab_parallel_embed, vocab_parallel_nll
from jaxllm.parallel.mesh import build_mesh, live_axes
from jaxllm.parallel.sharding import param_specs

# Loss: relative 1e-6. Gradients: per leaf max |g - g_ref| <= 1e-5 * max |g_ref| (psums over
# devices reassociate fp32 adds).
GRAD_TOL = 1e-5
FAST = {"xla_backend_optimization_level": 0}  # numerics, not speed: compile fast
B, T = 8, 16

DENSE = ModelConfig(name="manual-dense", vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=128)
BIAS_TIED = dataclasses.replace(DENSE, name="manual-bias", qkv_bias=True, qk_norm=True, tie_embeddings=True)
ODD_VOCAB = dataclasses.replace(DENSE, name="manual-odd-vocab", vocab_size=126)
MOE = dataclasses.replace(
  DENSE,
  name="manual-moe",
  n_experts=8,
  n_experts_per_tok=2,
  moe_d_ff=32,
  shared_expert_d_ff=32,
  shared_expert_gate=True,
)

#        config     dp tp ep etp
CASES = [
  (DENSE, 4, 2, 1, 1),  # GQA, kv heads split with the query heads
  (DENSE, 2, 4, 1, 1),  # tp > K: kv heads replicated, each rank keeps its one
  (BIAS_TIED, 2, 4, 1, 1),  # q/k/v biases (bk/bv sliced too), qk-norm, vocab-parallel tied head
  (ODD_VOCAB, 1, 8, 1, 1),  # 126 % 8: head and embedding replicated; one query head per rank
  (MOE, 4, 2, 4, 1),  # EP folded over dp and tp: all-to-all
  (MOE, 2, 2, 2, 2),
]  # experts split over ep and their hidden dim over etp, on 4 devices


def _perturbed_params(cfg):
  """Random init plus noise on every leaf, so biases, norms and gates are not 0 / 1."""
  params = jax.jit(init_params, static_argnums=(0, 1)).lower(cfg, 0).compile(compiler_options=FAST)()
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda a: a + jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype), params)


def _batch(cfg):
  tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  return jnp.asarray(tok[:, :-1]), jnp.asarray(tok[:, 1:])


def _reference_loss(mdef):
  def loss(params, tokens, targets):
    model = mdef.bind(params)
    h, aux, _ = model.hidden(tokens)
    nll, count = cross_entropy_sums(model.logits(h), targets)
    return nll / count + aux_loss(mdef.cfg, aux), aux

  return loss


def _manual_loss(mdef, mesh, plan):
  """The same loss with everything but the final division inside one all-manual shard_map."""
  cfg = mdef.cfg
  dp = live_axes(plan, "dp")
  tok_spec = P(dp or None, None)

  def body(params, tokens, targets):
    with manual(plan, cfg):
      b = tokens.shape[0]
      x = vocab_parallel_embed(tokens, params["embed"], plan, cfg.vocab_size, jnp.dtype(cfg.dtype))
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
      cos, sin = ops.rope_tables(positions, ops.rope_inv_freq(cfg))

      def layer(x, p):
        x, _, aux = block_forward(cfg, p, x, cos, sin, None, jnp.int32(0))
        return x, aux

      x, aux = jax.lax.scan(layer, x, localize_layer_params(params["layers"], plan, cfg))
      h = ops.rms_norm(x, params["final_norm"], cfg.norm_eps)
      w_head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
      nll = jnp.sum(vocab_parallel_nll(h, w_head, targets, plan, cfg.vocab_size))
      return (jax.lax.psum(nll, dp) if dp else nll), {k: jnp.mean(v) for k, v in aux.items()}

  fn = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(param_specs(mdef, plan), tok_spec, tok_spec),
    out_specs=P(),
    axis_names=set(mesh.axis_names),
    check_vma=True,
  )

  def loss(params, tokens, targets):
    with hooks.using(**mesh_hooks(mesh, plan, cfg)):  # as a train step would: must not leak inside
      nll, aux = fn(params, tokens, targets)
    return nll / targets.size + aux_loss(cfg, aux), aux

  return loss


@functools.cache
def _reference(cfg):
  """(params, tokens, targets, loss, aux, grads) of the plain single-device model, once per config."""
  params, (tokens, targets) = _perturbed_params(cfg), _batch(cfg)
  return (params, tokens, targets) + _grads(_reference_loss(model_def(cfg)), params, tokens, targets)[:3]


def _grads(loss_fn, params, tokens, targets):
  f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  compiled = f.lower(params, tokens, targets).compile(compiler_options=FAST)
  (loss, aux), grads = compiled(params, tokens, targets)
  return loss, aux, grads, compiled


@pytest.mark.parametrize("cfg,dp,tp,ep,etp", CASES, ids=[f"{c.name}-dp{d}tp{t}ep{e}etp{x}" for c, d, t, e, x in CASES])
def test_manual_matches_single_device(cfg, dp, tp, ep, etp):
  mc = MeshConfig(dp=dp, tp=tp, ep=ep, etp=etp)
  mesh, plan = build_mesh(mc, jax.devices()[: mc.num_devices])
  check_manual(cfg, plan)
  params, tokens, targets, ref_loss, ref_aux, ref_g = _reference(cfg)
  loss, aux, grads, compiled = _grads(_manual_loss(model_def(cfg), mesh, plan), params, tokens, targets)

  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for k in ref_aux:
    np.testing.assert_allclose(float(aux[k]), float(ref_aux[k]), rtol=1e-6, err_msg=k)
  flat_g, flat_r = jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_g)
  assert len(flat_g) == len(flat_r)
  for (path, g), r in zip(flat_g, flat_r):
    g, r = np.asarray(g), np.asarray(r)
    err, scale = np.abs(g - r).max(), np.abs(r).max()
    assert scale > 0 and err <= GRAD_TOL * scale, (
      f"gradient {jax.tree_util.keystr(path)}: max |diff| {err:.3g} vs max |ref| {scale:.3g} under {mc}"
    )
  # Experts split over ep exchange tokens with all-to-all inside the same shard_map.
  assert ("all-to-all" in compiled.as_text()) == (cfg.is_moe and ep > 1)


def test_check_manual_names_the_fix():
  _, plan = build_mesh(MeshConfig(dp=2, tp=4))
  cfg = ModelConfig(vocab_size=128, d_model=96, n_layers=1, n_heads=12, n_kv_heads=3, head_dim=8, d_ff=130)
  with pytest.raises(ConfigError, match=r"n_kv_heads=3 must divide or be divisible by mesh.tp=4.*d_ff=130"):
    check_manual(cfg, plan)
  _, plan = build_mesh(MeshConfig(dp=4, tp=2, ep=8, etp=1))
  with pytest.raises(ConfigError, match=r"n_experts=4 must be divisible by mesh.ep=8"):
    check_manual(dataclasses.replace(MOE, n_experts=4), plan)
  check_manual(MOE, plan)


def test_vary_marks_only_the_missing_axes():
  mesh, plan = build_mesh(MeshConfig(dp=4, tp=2))
  dp, tp = live_axes(plan, "dp"), live_axes(plan, "tp")

  def body(x):
    assert set(varying_axes(x)) == set(dp)
    y = vary({"a": x, "b": jnp.float32(1.0)}, dp + tp)
    assert all(set(varying_axes(v)) == set(dp + tp) for v in y.values())
    return jax.lax.psum(y["a"] * y["b"], dp + tp)

  fn = jax.shard_map(body, mesh=mesh, in_specs=P(dp), out_specs=P(), axis_names=set(mesh.axis_names))
  out = jax.jit(fn)(jnp.ones(4))
  np.testing.assert_allclose(np.asarray(out), [8.0])  # a 1 on each of 4 dp x 2 tp devices
