"""Pipeline (PP x vPP; GPipe order and interleaved 1F1B) == the non-pipelined model, fp32 on the
8-device CPU mesh, loss and every gradient; plus the schedule tables, the layout, the HLO of the step,
activation memory against m, and the state/checkpoint round trip.

Tolerances (fp32, matmul precision 'highest'): loss rtol 1e-5; each layer's slice of every stacked
gradient (and every other leaf) max|diff| <= 5e-5 * max|reference| (observed ~1e-6: only the
summation order differs).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import Config, ConfigError, MeshConfig, ModelConfig, TrainConfig, check_pipeline
from jaxllm.model.loss import cross_entropy
from jaxllm.model.params import init_params, model_def
from jaxllm.model.transformer import aux_loss
from jaxllm.parallel import pipeline as pl
from jaxllm.parallel.mesh import build_mesh
from jaxllm.parallel.schedule import make_schedule
from jaxllm.train.metrics import compiled_temp_bytes
from jaxllm.train.step import grads_and_metrics

SEQ = 16


def tiny(n_layers, **kw):
  base = dict(vocab_size=128, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=128)
  return ModelConfig(**{**base, **kw})


def make_batch(B, vocab, seed=0, mask=True):
  rng = np.random.default_rng(seed)
  batch = {
    "inputs": jnp.asarray(rng.integers(0, vocab, (B, SEQ)), jnp.int32),
    "targets": jnp.asarray(rng.integers(0, vocab, (B, SEQ)), jnp.int32),
  }
  if mask:  # uneven counted tokens per row, microbatch and accumulation chunk
    keep = np.array([0.05, 0.2, 0.5, 0.8, 1.0, 0.1, 0.9, 0.3])[np.arange(B) % 8]
    batch["mask"] = jnp.asarray(rng.random((B, SEQ)) < keep[:, None], jnp.int32)
  return batch


def assert_close(grads, metrics, ref_grads, ref_metrics):
  """Per-layer tolerances: every layer's slice of a stacked [L, ...] leaf on its own scale."""
  for k in ("loss", "aux_loss"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref, g = np.asarray(flat_ref[path]), np.asarray(g)
    name = jax.tree_util.keystr(path)
    pairs = zip(g, ref) if "layers" in name else [(g, ref)]
    for layer, (a, b) in enumerate(pairs):
      err = np.max(np.abs(a - b))
      assert err <= 5e-5 * np.max(np.abs(b)) + 1e-9, (name, layer, err, np.max(np.abs(b)))


def run_pipeline(mdef, mesh, plan, m, schedule, params, batch, grad_accum=1, remat=True):
  """Jit the pipelined gradients with params in the pipeline layout on their stages; returns
  (canonical grads, metrics, compiled)."""
  pipe = pl.Pipeline(mdef, mesh, plan, m, schedule, remat=remat)
  sh = pl.staged_shardings(mdef, mesh, plan)
  b_sh = NamedSharding(mesh, P(plan.dims["dp"] or None))
  staged = pl.staged_params(params, plan.cfg.pp, plan.cfg.vpp)
  with jax.set_mesh(mesh):
    fn = jax.jit(
      lambda p, b: grads_and_metrics(mdef, p, b, grad_accum, pipeline=pipe),
      in_shardings=(sh, b_sh),
      out_shardings=(sh, None),
    )
    compiled = fn.lower(staged, batch).compile()
    grads, metrics = compiled(jax.device_put(staged, sh), jax.device_put(batch, b_sh))
  return pl.canonical_params(grads), metrics, compiled


def microbatch_reference(mdef, params, batch, m):
  """Single-device loss and grads with the pipeline's MoE semantics: CE over the whole batch (one
  global token count), aux losses per microbatch averaged (as Megatron computes them under PP)."""
  cfg = mdef.cfg

  def loss(p, b):
    model = mdef.bind(p)

    def one(mb):
      out = model(mb["inputs"])
      return cross_entropy(out.logits, mb["targets"], mb["mask"]) * jnp.sum(mb["mask"]), aux_loss(cfg, out.aux)

    nll, aux = jax.lax.map(one, jax.tree.map(lambda x: pl.split_microbatches(x, m), b))
    ce, aux = jnp.sum(nll) / jnp.sum(b["mask"]), jnp.mean(aux)
    return ce + aux, {"loss": ce, "aux_loss": aux}

  (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch)
  return grads, metrics


# (schedule, pp, vpp, m, dp, tp, grad_accum, remat). One 24-layer model serves every pp*vpp.
DENSE = [
  ("1f1b", 2, 2, 5, 2, 2, 1, True),  # m % pp != 0, dp and tp inside the stages
  ("gpipe", 4, 1, 4, 2, 1, 2, True),  # accumulation over two pipelined chunks
  ("1f1b", 2, 3, 4, 1, 4, 1, True),  # vpp = 3; tp = 4 > 2 kv heads (replicated, sliced per rank)
  ("gpipe", 2, 2, 3, 2, 2, 1, False),  # no tick remat: the model's own per-layer policy
  ("1f1b", 4, 1, 6, 2, 1, 1, False),
]  # 1F1B stashing vjp residuals instead of recomputing
DENSE_SLOW = [
  ("1f1b", 8, 1, 8, 1, 1, 1, True),
  ("1f1b", 4, 2, 8, 2, 1, 1, True),
  ("gpipe", 2, 4, 4, 1, 4, 1, True),
  ("1f1b", 2, 1, 3, 4, 1, 2, True),
  ("gpipe", 4, 3, 5, 2, 1, 1, True),
  ("1f1b", 4, 3, 10, 1, 2, 1, True),
  ("1f1b", 2, 2, 8, 2, 2, 1, True),
]


@pytest.fixture(scope="module")
def dense_model():
  cfg = tiny(24)
  return model_def(cfg), init_params(cfg, 0)


def _dense_case(dense_model, schedule, pp, vpp, m, dp, tp, grad_accum, remat):
  mdef, params = dense_model
  batch = make_batch(2 * m * dp * grad_accum, mdef.cfg.vocab_size, seed=pp * 10 + m)
  ref = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, batch)
  mesh, plan = build_mesh(MeshConfig(pp=pp, vpp=vpp, dp=dp, tp=tp, microbatches=m, schedule=schedule))
  grads, metrics, compiled = run_pipeline(mdef, mesh, plan, m, schedule, params, batch, grad_accum, remat)
  assert_close(grads, metrics, *ref)
  check_hlo(compiled.as_text(), mesh, mdef, plan)


@pytest.mark.parametrize("schedule,pp,vpp,m,dp,tp,grad_accum,remat", DENSE)
def test_dense_pipeline_matches_single_device(dense_model, schedule, pp, vpp, m, dp, tp, grad_accum, remat):
  _dense_case(dense_model, schedule, pp, vpp, m, dp, tp, grad_accum, remat)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,pp,vpp,m,dp,tp,grad_accum,remat", DENSE_SLOW)
def test_dense_pipeline_grid(dense_model, schedule, pp, vpp, m, dp, tp, grad_accum, remat):
  _dense_case(dense_model, schedule, pp, vpp, m, dp, tp, grad_accum, remat)


# (schedule, pp, vpp, m, dp, tp, ep, etp): MoE with the all-to-all dispatch inside the stages.
MOE = [
  ("1f1b", 2, 2, 4, 2, 2, 4, 1),  # ep = 4 folded over dp = 2 x tp = 2
  ("gpipe", 2, 1, 3, 2, 2, 2, 2),
]  # ep = 2 x etp = 2, m % pp != 0
MOE_SLOW = [("gpipe", 2, 2, 4, 2, 2, 4, 1), ("1f1b", 2, 1, 3, 2, 2, 2, 2), ("1f1b", 4, 1, 4, 2, 1, 2, 1)]


def _moe_case(schedule, pp, vpp, m, dp, tp, ep, etp):
  # d_model 48 keeps activation shapes apart from weight shapes in the HLO checks.
  cfg = tiny(
    pp * vpp,
    d_model=48,
    n_experts=8,
    n_experts_per_tok=2,
    moe_d_ff=32,
    shared_expert_d_ff=24,
    shared_expert_gate=True,
    aux_loss_coef=0.1,
    z_loss_coef=0.01,
  )
  mdef, params = model_def(cfg), init_params(cfg, 2)
  batch = make_batch(2 * m * dp, cfg.vocab_size, seed=5)
  ref = microbatch_reference(mdef, params, batch, m)
  mesh, plan = build_mesh(MeshConfig(pp=pp, vpp=vpp, dp=dp, tp=tp, ep=ep, etp=etp, microbatches=m, schedule=schedule))
  grads, metrics, compiled = run_pipeline(mdef, mesh, plan, m, schedule, params, batch)
  assert float(metrics["aux_loss"]) > 0
  assert_close(grads, metrics, *ref)
  hlo = compiled.as_text()
  check_hlo(hlo, mesh, mdef, plan)
  a2a = [l for l in hlo.splitlines() if re.search(r"all-to-all(-start)?\(", l)]
  assert a2a, "no all-to-all: the experts inside the stages are not expert-parallel"


@pytest.mark.parametrize("schedule,pp,vpp,m,dp,tp,ep,etp", MOE)
def test_moe_pipeline_expert_parallel_inside_stages(schedule, pp, vpp, m, dp, tp, ep, etp):
  _moe_case(schedule, pp, vpp, m, dp, tp, ep, etp)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,pp,vpp,m,dp,tp,ep,etp", MOE_SLOW)
def test_moe_pipeline_grid(schedule, pp, vpp, m, dp, tp, ep, etp):
  _moe_case(schedule, pp, vpp, m, dp, tp, ep, etp)


def test_tied_embeddings_qkv_bias_qk_norm_pipeline():
  """Tied embeddings (the table's gradient comes from stage 0's lookup and the last stage's head),
  q/k/v biases and q/k norms, under 1F1B with tp inside the stages."""
  cfg = tiny(4, tie_embeddings=True, qkv_bias=True, qk_norm=True)
  mdef, params = model_def(cfg), init_params(cfg, 3)
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), params)
  batch = make_batch(8, cfg.vocab_size, seed=9)
  ref = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, batch)
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=2, dp=2, tp=2, microbatches=2))
  grads, metrics, _ = run_pipeline(mdef, mesh, plan, 2, "1f1b", params, batch)
  assert_close(grads, metrics, *ref)


def _groups(line):
  """Replica groups of a collective as lists of device ids (explicit {{..},{..}} form)."""
  m = re.search(r"replica_groups=\{(\{[\d,]+\}(?:,\{[\d,]+\})*)\}", line)
  return [[int(x) for x in g.split(",")] for g in re.findall(r"\{([\d,]+)\}", m.group(1))] if m else None


def _shapes(line):
  lhs = line.split("=", 1)[1].split("(")[0] if "=" in line else ""
  return [tuple(int(d) for d in s.split(",") if d) for s in re.findall(r"\[([\d,]*)\]", lhs)]


def check_hlo(hlo: str, mesh, mdef, plan):
  """What crosses stages is activations only: collective-permutes along the stage axis carrying
  [b, T, D]; no all-gather or all-to-all spans stages or carries a weight; all-reduces that span
  stages carry no layer weights (those are reduced over dp/edp inside their stage)."""
  stage = {int(d.id): c[0] for c, d in np.ndenumerate(mesh.devices)}
  coord = {int(d.id): c for c, d in np.ndenumerate(mesh.devices)}
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  weight_shapes = set()
  for leaf, spec in zip(
    jax.tree.leaves(mdef.abstract_params()["layers"]),
    jax.tree.leaves(pl.staged_specs(mdef, plan)["layers"], is_leaf=lambda x: isinstance(x, P)),
  ):
    local = list(leaf.shape[1:])
    for i, d in enumerate(tuple(spec)[3:]):
      for a in (d,) if isinstance(d, str) else (d or ()):
        local[i] //= sizes[a]
    weight_shapes |= {tuple(leaf.shape[1:]), tuple(local)}
  permutes = 0
  for line in hlo.splitlines():
    if re.search(r"collective-permute(-start)?\(", line):
      permutes += 1
      pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[1].split("}}")[0] + "}")
      for a, b in pairs:
        assert coord[int(a)][1:] == coord[int(b)][1:] and stage[int(a)] != stage[int(b)], line[:200]
      assert all(s[-1] == mdef.cfg.d_model and len(s) == 3 for s in _shapes(line)), line[:200]
    elif re.search(r"(all-gather|all-to-all)(-start)?\(", line):
      groups = _groups(line)
      assert groups and all(len({stage[d] for d in g}) == 1 for g in groups), f"spans stages: {line[:200]}"
      assert not set(_shapes(line)) & weight_shapes, f"moves a weight: {line[:200]}"
    elif re.search(r"all-reduce(-start)?\(", line):
      groups = _groups(line)
      if groups and any(len({stage[d] for d in g}) > 1 for g in groups):
        vpp = plan.cfg.vpp
        assert not any(len(s) > 3 and s[:2] == (vpp, 1) for s in _shapes(line)), (
          f"layer grads across stages: {line[:200]}"
        )
  assert permutes >= 1, "no collective-permute from the pipeline rings"


def test_head_runs_once_per_microbatch(monkeypatch):
  """The final norm + head + loss run on the last stage only, once per microbatch (per device of
  that stage), not on every stage: counted at run time with a host callback."""
  calls = []
  original = pl.Pipeline._head_nll

  def counted(self, head, y, targets, mask):
    jax.debug.callback(lambda: calls.append(1))
    return original(self, head, y, targets, mask)

  monkeypatch.setattr(pl.Pipeline, "_head_nll", counted)
  cfg = tiny(4)
  mdef, params = model_def(cfg), init_params(cfg, 1)
  m, dp, tp = 4, 2, 2
  batch = make_batch(2 * m * dp, cfg.vocab_size, seed=3)
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=2, dp=dp, tp=tp, microbatches=m))
  run_pipeline(mdef, mesh, plan, m, "1f1b", params, batch)
  jax.effects_barrier()
  assert len(calls) == m * dp * tp, len(calls)  # 4 microbatches x the 4 devices of the last stage


def test_1f1b_memory_flat_in_m_gpipe_grows():
  """Compiled temp memory per device from m = 4 to m = 32 at a fixed microbatch size: 1F1B's stash is
  bounded (~2*pp*vpp chunk inputs, or chunk residuals without remat), GPipe order keeps every
  microbatch's tick inputs."""
  cfg = tiny(4, vocab_size=64, d_ff=256)
  mdef = model_def(cfg)
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=1, dp=4, microbatches=2))
  sh = pl.staged_shardings(mdef, mesh, plan)
  abstract = jax.eval_shape(lambda p: pl.staged_params(p, 2, 1), mdef.abstract_params())

  def temp(m, schedule, remat=True):
    pipe = pl.Pipeline(mdef, mesh, plan, m, schedule, remat=remat)
    tokens = jax.ShapeDtypeStruct((m * 4, SEQ * 4), jnp.int32)
    with jax.set_mesh(mesh):
      fn = jax.jit(
        lambda p, b: grads_and_metrics(mdef, p, b, pipeline=pipe), in_shardings=(sh, None), out_shardings=(sh, None)
      )
      return compiled_temp_bytes(fn, abstract, {"inputs": tokens, "targets": tokens})

  ms = (4, 32)  # 1F1B's stash reaches its size (2*pp*vpp - 1 = 3 here) from m = 4 on
  one_f = [temp(m, "1f1b") for m in ms]
  residuals = [temp(m, "1f1b", remat=False) for m in ms]
  gpipe = [temp(m, "gpipe") for m in ms]
  assert one_f[1] <= 1.5 * one_f[0], one_f
  assert residuals[1] <= 1.5 * residuals[0], residuals
  assert gpipe[1] - gpipe[0] > 4 * max(one_f[1] - one_f[0], residuals[1] - residuals[0], 1), (gpipe, one_f, residuals)


@pytest.mark.parametrize(
  "kind,pp,vpp,m",
  [("gpipe", 2, 2, 4), ("1f1b", 2, 2, 5), ("1f1b", 4, 3, 10), ("1f1b", 2, 1, 8), ("1f1b", 4, 2, 8), ("gpipe", 4, 1, 6)],
)
def test_schedule_tables(kind, pp, vpp, m):
  """Replay the tables: every (chunk repeat, stage, microbatch) runs forward once, in chain order,
  each input arriving no later than it is needed; with 1f1b every backward once, after its forward,
  in reverse chain order; no bank slot is overwritten while live."""
  s = make_schedule(kind, pp, vpp, m)
  f_r, f_j, b_r, b_j = s.col("f_r"), s.col("f_j"), s.col("b_r"), s.col("b_j")
  fwd = {(int(f_r[t, st]), st, int(f_j[t, st])): t for t in range(s.ticks) for st in range(pp) if f_r[t, st] >= 0}
  assert sorted(fwd) == sorted((r, st, j) for r in range(vpp) for st in range(pp) for j in range(m))
  for (r, st, j), t in fwd.items():  # the chain predecessor ran at an earlier tick
    if (r, st) != (0, 0):
      prev = (r, st - 1, j) if st else (r - 1, pp - 1, j)
      assert fwd[prev] < t
  if kind == "1f1b":
    bwd = {(int(b_r[t, st]), st, int(b_j[t, st])): t for t in range(s.ticks) for st in range(pp) if b_r[t, st] >= 0}
    assert sorted(bwd) == sorted(fwd)
    for (r, st, j), t in bwd.items():
      assert t >= fwd[(r, st, j)]
      if (r, st) != (vpp - 1, pp - 1):
        nxt = (r, st + 1, j) if st < pp - 1 else (r + 1, 0, j)
        assert bwd[nxt] < t
    assert s.n_stash <= 2 * pp * vpp + (vpp - 1) * (m % pp) + pp, s.n_stash
    assert make_schedule(kind, pp, vpp, 4 * m).n_stash <= s.n_stash + (vpp - 1) * pp  # flat in m
  else:
    assert s.ticks == m * vpp + pp - 1
    assert s.bubble == pytest.approx((pp - 1) / (m * vpp + pp - 1))


def test_layout_round_trip_and_placement():
  cfg = tiny(8)
  params = init_params(cfg, 0)["layers"]
  for pp, vpp in ((2, 2), (4, 2), (2, 4), (8, 1)):
    staged = pl.to_pipeline_layout(params, pp, vpp)
    C = 8 // (pp * vpp)
    assert staged["wq"].shape == (vpp, pp, C) + params["wq"].shape[1:]
    back = pl.from_pipeline_layout(staged)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    for layer in range(8):
      r, s, c = pl.stage_of_layer(layer, 8, pp, vpp)
      assert s == (layer // C) % pp and r == layer // (C * pp)  # Megatron placement
      np.testing.assert_array_equal(staged["wq"][r, s, c], params["wq"][layer])


def test_validation():
  with pytest.raises(ConfigError, match="divisible by mesh.pp\\*mesh.vpp"):
    check_pipeline(2, 2, 4, n_layers=6)
  with pytest.raises(ConfigError, match="must be >= mesh.pp"):
    check_pipeline(4, 1, 2, n_layers=8)
  with pytest.raises(ConfigError, match="mesh.vpp=2 needs mesh.pp > 1"):
    MeshConfig(vpp=2, dp=8)
  with pytest.raises(ConfigError, match="train.grad_accum=4"):
    MeshConfig(dp=8, microbatches=4)
  with pytest.raises(ConfigError, match="not a pipeline schedule"):
    MeshConfig(pp=2, dp=4, microbatches=2, schedule="zb-h1")
  with pytest.raises(ConfigError, match="divisible by mesh.pp\\*mesh.vpp"):
    Config(model=tiny(6), mesh=MeshConfig(pp=2, vpp=2, dp=4, microbatches=4), train=TrainConfig(batch_size=16))
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=2, dp=1, tp=4, microbatches=4))
  with pytest.raises(ConfigError, match="n_heads=6 must be divisible by mesh.tp=4"):
    pl.Pipeline(model_def(tiny(4, n_heads=6, n_kv_heads=2, head_dim=16)), mesh, plan, 4)
  mdef = model_def(tiny(4))
  pipe = pl.Pipeline(mdef, mesh, plan, 4)
  staged = jax.eval_shape(lambda p: pl.staged_params(p, 2, 2), mdef.abstract_params())
  with pytest.raises(ConfigError, match="does not split into 4 microbatches"):
    jax.eval_shape(lambda p, b: grads_and_metrics(mdef, p, b, pipeline=pipe), staged, make_batch(6, 128, mask=False))


def test_train_state_layout_and_checkpoint_round_trip(tmp_path):
  """On a pp mesh the train state holds the layers in pipeline layout on their stages; the step equals
  the single-device step; saved through `relayout` the checkpoint is canonical and restores on one
  device, and a canonical checkpoint restores into the pipeline layout."""
  import optax

  from jaxllm.parallel import mesh_hooks
  from jaxllm.train.checkpoint import Checkpointer
  from jaxllm.train.state import Layout, abstract_state, init_state, relayout, state_shardings
  from jaxllm.train.step import TrainState, make_train_step

  cfg = tiny(4)
  mdef, params = model_def(cfg), init_params(cfg, 6)
  tx = optax.adam(1e-2, eps=1e-3)  # eps well above the grads' rounding noise: updates comparable
  batch = make_batch(8, cfg.vocab_size, seed=7)
  ref_state, ref_metrics = make_train_step(mdef, tx)(  # donates its input: give it a copy
    jax.tree.map(jnp.copy, TrainState(params, tx.init(params), jnp.int32(0))), batch
  )
  mesh, plan = build_mesh(MeshConfig(pp=2, vpp=2, dp=4, microbatches=2))
  layout = Layout.of(plan)
  sh, disk = state_shardings(mdef, tx, mesh, plan), state_shardings(mdef, tx, mesh, plan, layout=Layout())
  b_sh = NamedSharding(mesh, P(plan.dims["dp"]))
  with jax.set_mesh(mesh):
    state = init_state(mdef, tx, sh, 0, params=params, layout=layout)
    assert state.params["layers"]["wq"].shape[:3] == (2, 2, 1) and state.params["layers"]["wq"].sharding.spec[1] == "pp"
    step = make_train_step(
      mdef, tx, sh, b_sh, hook_kwargs=mesh_hooks(mesh, plan, cfg), pipeline=pl.Pipeline(mdef, mesh, plan, 2)
    )
    new, metrics = step(state, jax.device_put(batch, b_sh))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    saved = relayout(tx, new, layout, disk, to_memory=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), saved.params, ref_state.params)
  ckpt = Checkpointer(str(tmp_path / "ck"), async_save=False)
  ckpt.save(1, saved, {}, Config(model=cfg))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  single = jax.tree.map(lambda _: one, TrainState(params, tx.init(params), jnp.int32(0)))
  p1, o1, _ = ckpt.restore(abstract_state(mdef, tx, single), 1)
  jax.tree.map(np.testing.assert_array_equal, p1, jax.device_get(saved.params))
  p2, o2, meta = ckpt.restore(abstract_state(mdef, tx, disk), 1)
  with jax.set_mesh(mesh):
    back = relayout(tx, TrainState(p2, o2, jnp.int32(1)), layout, sh, to_memory=True)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.params), jax.device_get(new.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.opt_state), jax.device_get(new.opt_state))
  ckpt.close()
