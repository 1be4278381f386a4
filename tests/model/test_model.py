"""The shared model: cached decode == full forward, MoE == per-token expert loop, param count."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MODEL_PRESETS, ModelConfig
from jaxllm.model import KVCache, Transformer, aux_loss
from jaxllm.model.moe import local_experts, route
from jaxllm.model.params import count_params, init_params, model_def

BASE = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, init_std=0.2)


def variants():
  yield "dense-gqa", BASE
  yield "dense-mha", dataclasses.replace(BASE, n_kv_heads=4)
  yield (
    "dense-qwen",
    dataclasses.replace(
      BASE, qkv_bias=True, qk_norm=True, tie_embeddings=True, rope_scaling="llama3", rope_original_max_pos=16
    ),
  )
  yield "moe-gqa", dataclasses.replace(BASE, n_experts=4, n_experts_per_tok=2, moe_d_ff=32)
  yield (
    "moe-mha-shared",
    dataclasses.replace(
      BASE,
      n_kv_heads=4,
      n_experts=4,
      n_experts_per_tok=2,
      moe_d_ff=32,
      shared_expert_d_ff=48,
      shared_expert_gate=True,
      moe_renormalize=False,
    ),
  )


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
  for lo, hi in [(0, 7), (7, 8), (8, 9), (9, 13)]:  # prefill, two single-token steps, a chunk
    out = model(tokens[:, lo:hi], cache=cache)
    cache = out.cache
    pieces.append(out.logits)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=2e-5, rtol=2e-5)
  assert np.asarray(cache.lengths).tolist() == [13, 13, 13]
  assert float(jnp.std(full)) > 0.1  # logits are not trivially small


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


def _np_route(x, w_router, k, renormalize):
  """Independent numpy (float64) reference of `route`: top-k by sorting, f_e by counting."""
  x, w = np.asarray(x, np.float64), np.asarray(w_router, np.float64)
  E = w.shape[-1]
  logits = np.einsum("btd,de->bte", x, w)
  m = logits.max(-1, keepdims=True)
  ex = np.exp(logits - m)
  probs = ex / ex.sum(-1, keepdims=True)
  lse = m[..., 0] + np.log(ex.sum(-1))
  ids = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
  weights = np.take_along_axis(probs, ids, -1)
  if renormalize:
    weights = weights / weights.sum(-1, keepdims=True)
  counts = np.zeros(E)
  for e in ids.reshape(-1):
    counts[e] += 1
  f = counts / ids.size  # fraction of the B*T*k routed slots that chose e
  P = probs.reshape(-1, E).mean(0)  # mean router prob of e over all tokens
  return dict(
    ids=ids,
    weights=weights,
    probs=probs,
    logits=logits,
    f=f,
    P=P,
    counts=counts,
    load_balance=E * np.sum(f * P),
    router_z=np.mean(lse**2),
  )


@pytest.mark.parametrize("E,k,renorm", [(8, 2, True), (8, 2, False), (8, 3, True), (8, 3, False), (6, 3, True)])
def test_route_matches_numpy_reference(E, k, renorm):
  """route(x, w, k, renorm) with k < E and a non-uniform random router: ids are the top-k experts
  in descending prob order; weights their probs (renormalised to sum 1 iff renorm);
  load_balance = E * sum_e f_e P_e with f_e = (#slots routed to e) / (B*T*k) and P_e the mean full
  softmax prob; router_z = mean_t logsumexp(logits_t)^2. The known wrong variants (k and E swapped,
  no 1/k, P_e from the top-k probs) are asserted to give clearly different values (> 5%)."""
  rng = np.random.default_rng(100 * E + k)
  B, T, D = 3, 11, 16
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  w = (rng.normal(size=(D, E)) * 0.5 + 0.3 * rng.normal(size=(1, E))).astype(np.float32)  # skewed
  ref = _np_route(x, w, k, renorm)
  srt = np.sort(ref["probs"], -1)[..., ::-1]
  assert np.min(srt[..., :k] - srt[..., 1 : k + 1]) > 1e-5  # no near-ties: the ids are well defined
  assert np.std(ref["P"]) > 0.02 and np.std(ref["counts"]) > 1  # router really is non-uniform

  ids, weights, aux = route(jnp.asarray(x), jnp.asarray(w), k, renorm)
  assert ids.shape == (B, T, k) and weights.shape == (B, T, k) and weights.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(ids), ref["ids"])
  np.testing.assert_allclose(weights, ref["weights"], rtol=1e-5, atol=1e-6)
  if renorm:
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)
  else:
    assert np.all(np.asarray(weights).sum(-1) < 1 - 1e-3)
  np.testing.assert_allclose(float(aux["load_balance"]), ref["load_balance"], rtol=1e-5)
  np.testing.assert_allclose(float(aux["router_z"]), ref["router_z"], rtol=1e-5)

  # The reference itself must separate the right formula from the plausible wrong ones.
  f, P, lb, N = ref["f"], ref["P"], ref["load_balance"], B * T
  assert abs(f.sum() - 1) < 1e-12
  wrong = {
    "k and E swapped": k * np.sum(ref["counts"] / (N * E) * P),
    "missing 1/k": E * np.sum(ref["counts"] / N * P),
    # P_e as the mean of the (un-renormalised) top-k weights instead of the full softmax probs
    "P from top-k probs": E
    * np.sum(
      f
      * np.bincount(ref["ids"].reshape(-1), np.take_along_axis(ref["probs"], ref["ids"], -1).reshape(-1), minlength=E)
      / N
    ),
  }
  for name, v in wrong.items():
    assert abs(v - lb) > 0.05 * lb, name


def test_route_aux_closed_form():
  """A hand-built router (logits [c, c, 0, 0] for every token, E=4, k=2): every token picks experts
  {0, 1}, so f = [1/2, 1/2, 0, 0], P = [a, a, b, b] with a = e^c / (2e^c + 2), and
  load_balance = E * (a/2 + a/2) = 4a (swapped k/E would give a, a missing 1/k 8a, P_e from the
  renormalised top-k weights 2); router_z = log(2e^c + 2)^2."""
  c = 2.0
  x = jnp.ones((2, 5, 1))
  w = jnp.asarray([[c, c, 0.0, 0.0]])
  ids, weights, aux = route(x, w, 2, False)
  assert sorted(np.unique(np.asarray(ids)).tolist()) == [0, 1]
  a = np.exp(c) / (2 * np.exp(c) + 2)
  np.testing.assert_allclose(weights, np.full((2, 5, 2), a), rtol=1e-6)
  np.testing.assert_allclose(float(aux["load_balance"]), 4 * a, rtol=1e-6)
  assert min(abs(4 * a - wrong) for wrong in (a, 8 * a, 2.0)) > 0.2  # 4a = 1.76 here
  np.testing.assert_allclose(float(aux["router_z"]), np.log(2 * np.exp(c) + 2) ** 2, rtol=1e-6)
  _, w_renorm, aux_renorm = route(x, w, 2, True)  # renormalisation changes weights, not aux
  np.testing.assert_allclose(w_renorm, 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(aux_renorm["load_balance"]), 4 * a, rtol=1e-6)


def test_aux_loss_gradient_wrt_router():
  """jax.grad of aux_loss(cfg, route(...).aux) w.r.t. the router weights equals the analytic
  gradient: f_e is piecewise constant, so d load_balance / d logits[t, j] = (E/N) p_tj (f_j - <f, p_t>),
  and d router_z / d logits[t, j] = (2/N) lse_t p_tj; both coefficients are applied. Also checked
  against float32 central differences on a few coordinates (top-k unchanged by the step)."""
  E, k, B, T, D = 8, 2, 2, 16, 12
  cfg = dataclasses.replace(BASE, n_experts=E, n_experts_per_tok=k, moe_d_ff=16, aux_loss_coef=0.3, z_loss_coef=0.05)
  rng = np.random.default_rng(10)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  w = (rng.normal(size=(D, E)) * 0.5 + rng.normal(size=(1, E))).astype(np.float32)
  eps = 3e-3  # finite-difference step below: moves any logit gap by at most 2 * eps * max|x|
  srt = np.sort(np.einsum("btd,de->bte", x.astype(np.float64), w), -1)[..., ::-1]
  assert np.min(srt[..., :k] - srt[..., 1 : k + 1]) > 4 * eps * np.abs(x).max()  # top-k stays put

  def loss(w_router, coef_lb=cfg.aux_loss_coef, coef_z=cfg.z_loss_coef):
    c = dataclasses.replace(cfg, aux_loss_coef=coef_lb, z_loss_coef=coef_z)
    return aux_loss(c, route(jnp.asarray(x), w_router, k, True)[2])

  grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
  g = np.asarray(grad(jnp.asarray(w)), np.float64)

  ref = _np_route(x, w, k, True)
  p, f, N = ref["probs"], ref["f"], B * T
  lse = np.log(np.exp(ref["logits"]).sum(-1))
  d_lb = (E / N) * p * (f - (p * f).sum(-1, keepdims=True))
  d_z = (2 / N) * lse[..., None] * p
  d_logits = cfg.aux_loss_coef * d_lb + cfg.z_loss_coef * d_z
  want = np.einsum("btd,bte->de", x.astype(np.float64), d_logits)
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())

  # Each term alone has a non-zero gradient (the load-balance one flows through P_e only).
  g_lb = np.asarray(grad(jnp.asarray(w), 1.0, 0.0))
  np.testing.assert_allclose(
    g_lb, np.einsum("btd,bte->de", x.astype(np.float64), d_lb), rtol=1e-4, atol=1e-6 * np.abs(d_lb).max()
  )
  assert np.abs(g_lb).max() > 1e-3
  assert np.abs(np.asarray(grad(jnp.asarray(w), 0.0, 1.0))).max() > 1e-3

  # Finite differences in float32 on a few coordinates (step small enough to keep the top-k).
  coords, stepped = [(0, 0), (3, 5), (7, 2), (11, 7), (5, 1)], []
  for d, e in coords:
    for sign in (1, -1):
      ws = w.copy()
      ws[d, e] += sign * eps
      assert np.array_equal(_np_route(x, ws, k, True)["ids"], ref["ids"])  # f_e unchanged by the step
      stepped.append(ws)
  vals = np.asarray(jax.jit(jax.vmap(loss))(jnp.asarray(np.stack(stepped))), np.float64)
  fd = (vals[0::2] - vals[1::2]) / (2 * eps)
  np.testing.assert_allclose([g[d, e] for d, e in coords], fd, rtol=2e-2, atol=2e-4)


def test_model_aux_is_layer_mean_of_route_aux(monkeypatch):
  """A tiny MoE model (k < E): out.aux[name] == mean over layers of the numpy-reference route aux of
  each layer's MLP input (layers run by hand with block_forward), and aux_loss(cfg, out.aux) ==
  aux_loss_coef * load_balance + z_loss_coef * router_z."""
  from jaxllm.model import layers as ops
  from jaxllm.model import transformer as tr

  cfg = dataclasses.replace(
    BASE, n_layers=3, n_experts=8, n_experts_per_tok=2, moe_d_ff=16, aux_loss_coef=0.3, z_loss_coef=0.05
  )
  params = init_params(cfg, 0)
  model = model_def(cfg).bind(params)
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size)
  out = model(tokens)
  assert set(out.aux) == {"load_balance", "router_z"}

  orig = tr.moe_mlp
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  cos, sin = ops.rope_tables(positions, ops.rope_inv_freq(cfg))

  @jax.jit
  def one_layer(p, x):  # one block by hand, also returning the MoE input h of that block
    box = []
    monkeypatch.setattr(tr, "moe_mlp", lambda h, p_, c: (box.append(h), orig(h, p_, c))[1])
    try:
      x, _, aux_l = tr.block_forward(cfg, p, x, cos, sin, None, 0)
    finally:
      monkeypatch.setattr(tr, "moe_mlp", orig)
    assert len(box) == 1
    return x, aux_l, box[0]

  x = model.embed_tokens(tokens)
  stacked = model.layer_params()
  per_layer, seen = [], []
  for layer in range(cfg.n_layers):
    p = {n: a[layer] for n, a in stacked.items()}
    x, aux_l, h = one_layer(p, x)
    per_layer.append({n: float(v) for n, v in aux_l.items()})
    seen.append((np.asarray(h), np.asarray(p["router"])))
  by_hand = model.logits(ops.rms_norm(x, model.final_norm[...], cfg.norm_eps))
  np.testing.assert_allclose(by_hand, out.logits, atol=1e-4, rtol=1e-4)  # same computation

  ref = [_np_route(h, r, cfg.n_experts_per_tok, cfg.moe_renormalize) for h, r in seen]
  for name in ("load_balance", "router_z"):
    vals = np.array([r[name] for r in ref])
    np.testing.assert_allclose([a[name] for a in per_layer], vals, rtol=1e-4)
    assert np.ptp(vals) > 0.02 * np.abs(vals).max()  # layers differ: mean != first/last layer
    np.testing.assert_allclose(float(out.aux[name]), vals.mean(), rtol=1e-4)
  lb, z = float(out.aux["load_balance"]), float(out.aux["router_z"])
  assert lb > 1.0 + 1e-3  # a random router is not perfectly balanced
  np.testing.assert_allclose(float(aux_loss(cfg, out.aux)), 0.3 * lb + 0.05 * z, rtol=1e-6)
  assert float(aux_loss(BASE, {})) == 0.0


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
