"""The optimizer: which parameters get weight decay (by what they are, for every preset), and a
learning-rate schedule whose horizon does not move when a finished run is continued."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import MODEL_PRESETS, ModelConfig, TrainConfig
from jaxllm.model.params import init_params, model_def
from jaxllm.train.optim import decay_mask, lr_schedule, make_optimizer

# Every parameter name the model can have, and whether AdamW decays it. A new parameter must be
# added to one of the two sets, so its decay is a decision, not an accident of its shape.
DECAYED = {
  "embed",
  "lm_head",
  "wq",
  "wk",
  "wv",
  "wo",
  "w_gate",
  "w_up",
  "w_down",
  "router",
  "shared_gate",
  "shared_up",
  "shared_down",
}
NOT_DECAYED = {"attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm", "bq", "bk", "bv", "shared_expert_gate"}

# Every preset, plus one model with every optional parameter (biases, q/k norm, tied head, shared
# expert with gate) and one whose d_model is large (the old shape rule flipped lm_head at 1024).
EVERYTHING = ModelConfig(
  name="everything",
  vocab_size=64,
  d_model=32,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  d_ff=64,
  n_experts=4,
  moe_d_ff=16,
  shared_expert_d_ff=16,
  shared_expert_gate=True,
  qkv_bias=True,
  qk_norm=True,
)
CONFIGS = {
  **MODEL_PRESETS,
  "everything": EVERYTHING,
  "everything-tied": dataclasses.replace(EVERYTHING, tie_embeddings=True),
  "wide-dense": ModelConfig(
    name="wide", vocab_size=64, d_model=2048, n_layers=1, n_heads=16, n_kv_heads=4, d_ff=64, qkv_bias=True
  ),
}


def flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decay_mask_by_what_a_parameter_is(name):
  mdef = model_def(CONFIGS[name])
  mask = flat(decay_mask(mdef.logical))
  for path, decayed in mask.items():
    leaf = path.split("'")[-2]
    assert leaf in DECAYED | NOT_DECAYED, f"{path}: add it to DECAYED or NOT_DECAYED"
    assert decayed == (leaf in DECAYED), f"{name}: {path} decayed={decayed}"


def test_optimizer_applies_the_mask():
  """One AdamW step with zero gradients moves exactly the decayed parameters (by -lr*wd*p)."""
  cfg = EVERYTHING
  tcfg = TrainConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0.0, steps=10)
  mdef, params = model_def(cfg), init_params(cfg, 0)
  params = jax.tree.map(lambda p: p + 1.0, params)  # norms are 1, biases 0: make every leaf non-zero
  tx = make_optimizer(tcfg, mdef.logical)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  lr0 = float(lr_schedule(tcfg)(0))
  for path, u in flat(updates).items():
    p = flat(params)[path]
    want = -lr0 * 0.5 * np.asarray(p) if path.split("'")[-2] in DECAYED else np.zeros_like(p)
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, atol=1e-9, err_msg=path)


def test_schedule_horizon_is_its_own_key():
  """A 100-step run continued to 200 steps keeps decay_steps=100: identical up to 100, then flat at
  the floor (no jump back up as re-stretching the cosine over 200 steps would give)."""
  first = TrainConfig(steps=100, decay_steps=100, warmup_steps=10, lr=1e-2, min_lr_ratio=0.1)
  longer = dataclasses.replace(first, steps=200)
  a, b = lr_schedule(first), lr_schedule(longer)
  for s in range(0, 101, 5):
    assert float(a(s)) == pytest.approx(float(b(s)))
  assert float(b(100)) == pytest.approx(1e-3) and float(b(150)) == pytest.approx(1e-3)
  stretched = lr_schedule(dataclasses.replace(longer, decay_steps=0))  # horizon = steps: the old jump
  assert float(stretched(100)) > 3 * float(a(100))


def test_no_warmup_starts_at_the_peak():
  """warmup_steps=0 means the first step already uses lr (not 0, as a one-step warmup would give)."""
  sched = lr_schedule(TrainConfig(steps=100, warmup_steps=0, lr=1e-3, min_lr_ratio=0.1))
  assert float(sched(0)) == pytest.approx(1e-3) and float(sched(100)) == pytest.approx(1e-4)
  flat_lr = lr_schedule(TrainConfig(steps=100, warmup_steps=0, lr=1e-3, min_lr_ratio=1.0))
  assert all(float(flat_lr(s)) == pytest.approx(1e-3) for s in (0, 50, 99))
