"""jaxllm.rl.reward_model: the Bradley-Terry loss and its gradient against numpy, the head reading the
last real token (padding never changes a score), the preference objective inside jaxllm.train's step
(one denominator: pairs; accumulation never splits a pair), preference data (the addition task's
pairs, malformed jsonl lines), and end to end: `train.py reward` trains a tiny random-init reward model
on addition preference pairs to a held-out pair accuracy well above chance and writes a checkpoint,
which the reward "rm:DIR" loads through RewardSpec.parse / combine and uses to rank correct answers
above wrong ones."""

import contextlib
import importlib.util
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError, RewardConfig, load_config
from jaxllm.data import ByteTokenizer
from jaxllm.data.tasks import AdditionTask, PreferencePair, answer_line
from jaxllm.io.checkpoint import read_meta
from jaxllm.model.params import init_params, model_def
from jaxllm.rl import reward_model as R
from jaxllm.rl.rewards import RewardSpec, combine
from jaxllm.train.step import grads_and_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
train_cli = importlib.util.module_from_spec(_spec)  # the command line, train.py
_spec.loader.exec_module(train_cli)

MESH = os.path.join(ROOT, "meshes", "cpu-8.toml")
TINY = [
  "model.n_layers=2",
  "model.d_model=64",
  "model.d_ff=128",
  "model.n_heads=4",
  "model.n_kv_heads=2",
  "model.vocab_size=259",
]


def _tiny(seed=0):
  cfg = load_config([], [f"mesh={MESH}", *TINY]).model
  mdef = model_def(cfg)
  return mdef, jax.jit(lambda: {"backbone": init_params(cfg, seed), "head": R.init_head(cfg, seed + 1)})()


# ---- the loss ----


def test_bradley_terry_loss_and_gradient_match_numpy():
  rc = np.array([1.5, -0.3, 0.0, 2.0, -4.0], np.float32)
  rr = np.array([0.5, 0.7, 0.0, -1.0, 3.0], np.float32)
  m = rc.astype(np.float64) - rr
  want = np.mean(np.log1p(np.exp(-m)))  # -log sigmoid(m), averaged
  got, (g_c, g_r) = jax.value_and_grad(R.bradley_terry_loss, argnums=(0, 1))(jnp.asarray(rc), jnp.asarray(rr))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  d = -(1.0 - 1.0 / (1.0 + np.exp(-m))) / len(m)  # d/dm of -log sigmoid(m), over the mean
  np.testing.assert_allclose(np.asarray(g_c), d, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_r), -d, rtol=1e-5, atol=1e-7)
  s, right, margin = R.bradley_terry_sums(jnp.asarray(rc), jnp.asarray(rr))
  assert float(right) == 2 and abs(float(margin) - m.sum()) < 1e-5  # the tie (0, 0) is not ranked right
  # Stable far out: no overflow for large margins either way.
  big = R.bradley_terry_loss(jnp.array([100.0, -100.0]), jnp.array([-100.0, 100.0]))
  np.testing.assert_allclose(float(big), 100.0, rtol=1e-6)


def _pair_batch(pairs, T=16):
  return R.encode_pairs(pairs, ByteTokenizer(), T)[0]


def test_objective_in_the_train_step_counts_pairs_and_never_splits_one():
  mdef, params = _tiny()
  pairs = AdditionTask(seed=5).preference_pairs(8)
  batch = {k: jnp.asarray(v) for k, v in _pair_batch(pairs).items()}
  r = np.asarray(jax.jit(lambda p, b: R.pair_scores(mdef, p, b)[0])(params, batch))
  step = jax.jit(lambda p, b, accum: grads_and_metrics(mdef, p, b, accum, objective=R.PREFERENCE), static_argnums=2)
  g1, m1 = step(params, batch, 1)
  m = r[:, 0].astype(np.float64) - r[:, 1]
  np.testing.assert_allclose(float(m1["loss"]), np.mean(np.log1p(np.exp(-m))), rtol=1e-5)
  np.testing.assert_allclose(float(m1["accuracy"]), np.mean(m > 0))
  assert float(m1["tokens"]) == 8  # the one denominator: pairs
  g2, m2 = step(params, batch, 2)
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  # BT sees score differences only: the bias gets no gradient, the head's vector and the backbone do.
  assert float(g1["head"]["b"]) == 0.0 and float(jnp.abs(g1["head"]["w"]).sum()) > 0
  assert float(jnp.abs(g1["backbone"]["layers"]["wq"]).sum()) > 0


# ---- the head reads the last real token ----


def test_head_reads_the_last_real_token_and_padding_changes_nothing():
  mdef, params = _tiny()
  tok = ByteTokenizer()
  seqs = [tok.encode("\n12+34=46\n"), tok.encode("\n7+8=15\n"), tok.encode("\n9+9=18")]
  score_fn = jax.jit(lambda p, tokens, lengths: R.last_token_scores(mdef, p, tokens, lengths)[0])

  def scores(T, fill, lengths=[len(s) for s in seqs]):
    tokens = np.full((len(seqs), T), fill, np.int32)
    for i, s in enumerate(seqs):
      tokens[i, : len(s)] = s
    return np.asarray(score_fn(params, tokens, np.asarray(lengths, np.int32)))

  base = scores(16, tok.pad_id)
  np.testing.assert_allclose(scores(32, tok.pad_id), base, rtol=1e-5, atol=1e-6)  # more padding
  np.testing.assert_allclose(scores(16, ord("7")), base, rtol=1e-5, atol=1e-6)  # other pad tokens
  # The score is w . h + b at the last real token of the unpadded sequence, nothing else.
  h, _, _ = jax.jit(lambda p, x: mdef.bind(p).hidden(x))(params["backbone"], jnp.asarray([seqs[0]], jnp.int32))
  np.testing.assert_allclose(base[0], float(h[0, -1] @ params["head"]["w"] + params["head"]["b"]), rtol=1e-5)
  # Reading one token earlier would give another score: the last token matters.
  assert np.all(np.abs(scores(16, tok.pad_id, [len(s) - 1 for s in seqs]) - base) > 1e-4)


# ---- data ----


def test_addition_preference_pairs_are_checkable_and_deterministic(tmp_path):
  task = AdditionTask(digits_min=1, digits_max=3, seed=2)
  for mistakes in [("carry", "digit"), ("carry",), ("digit",), ("typo",)]:
    pairs = task.preference_pairs(300, mistakes=mistakes)
    for pair, p in zip(pairs, task.problems(300)):
      assert pair.prompt == task.prompt(p) and answer_line(pair.chosen) == task.answer(p)
      wrong = answer_line(pair.rejected)
      assert wrong != task.answer(p) and wrong.isdigit() and (wrong == "0" or wrong[0] != "0")
      assert pair.chosen.endswith("\n") and pair.rejected.endswith("\n")
  pairs = task.preference_pairs(300)
  assert pairs == AdditionTask(digits_min=1, digits_max=3, seed=2).preference_pairs(300)
  assert task.preference_pairs(40) == pairs[:40] and task.preference_pairs(300, seed=3) != pairs
  # Held-out pairs come from held-out problems only.
  held = task.preference_pairs(100, "heldout")
  assert {p.prompt for p in held} == {task.prompt(q) for q in task.problems(100, "heldout")}
  # A dropped carry: 57+68=125 -> 115 or 25.
  rng = np.random.default_rng(0)
  from jaxllm.data.tasks import Addition

  assert {task.wrong_answer(Addition(57, 68), rng, ("carry",)) for _ in range(50)} == {"115", "25"}
  with pytest.raises(ValueError, match="unknown.*'nope'"):
    task.preference_pairs(3, mistakes=("nope",))
  path = task.write_preference_file(str(tmp_path / "p.jsonl"), 20, "heldout", mistakes=("typo",))
  assert R.read_preference_pairs(path) == task.preference_pairs(20, "heldout", mistakes=("typo",))


@pytest.mark.parametrize(
  "line, match",
  [
    ('{"prompt": "a", "chosen": "b"', r"p.jsonl:3: not valid JSON"),
    ('["a", "b", "c"]', r"p.jsonl:3: expected a JSON object .* found a list"),
    ('{"prompt": "a", "chosen": "b"}', r"p.jsonl:3: missing 'rejected' \(the line has 'chosen', 'prompt'\)"),
    ('{"chosen": "b"}', r"p.jsonl:3: missing 'prompt', 'rejected'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', r"p.jsonl:3: 'chosen' must be a string, got int"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}', r"p.jsonl:3: 'chosen' and 'rejected' are the same"),
  ],
)
def test_malformed_jsonl_lines_name_the_line_and_the_problem(tmp_path, line, match):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "\\n1+1=", "chosen": "2\\n", "rejected": "3\\n", "id": 7}\n\n' + line + "\n")
  with pytest.raises(ValueError, match=match):
    R.read_preference_pairs(str(path))


def test_data_and_config_errors(tmp_path):
  path = tmp_path / "ok.jsonl"
  path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
  assert R.read_preference_pairs(str(path)) == [PreferencePair("p", "a", "b")]
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="holds no preference pairs"):
    R.read_preference_pairs(str(tmp_path / "empty.jsonl"))
  with pytest.raises(ValueError, match="does not exist"):
    R.read_preference_pairs(str(tmp_path / "nope.jsonl"))
  with pytest.raises(ConfigError, match="no preference data: pass --data"):
    R.load_pairs(RewardConfig())
  with pytest.raises(ConfigError, match="leaves 1 to train on and 0 held out"):  # one prompt: one split
    R.load_pairs(RewardConfig(data=str(path)))
  assert load_config([], ["reward.eval_fraction=0.25", "reward.data=x.jsonl"]).reward == RewardConfig(
    data="x.jsonl", eval_fraction=0.25
  )
  with pytest.raises(ConfigError, match="unknown config key reward.evaldata; did you mean reward.eval_data"):
    load_config([], ["reward.evaldata=x"])
  with pytest.raises(ConfigError, match="reward.eval_fraction expects float"):
    load_config([], ["reward.eval_fraction=lots"])
  toml = tmp_path / "rm.toml"  # a [reward] table works like reward.key=value
  toml.write_text('[reward]\ndata = "pairs.jsonl"\neval_fraction = 0.2\n[train]\nsteps = 3\n')
  cfg = load_config([str(toml)], ["reward.eval_fraction=0.3"])
  assert cfg.reward == RewardConfig(data="pairs.jsonl", eval_fraction=0.3) and cfg.train.steps == 3
  # Left truncation keeps the end (the head reads it) and counts the pairs that lost their start.
  data, cut = R.encode_pairs([PreferencePair("x" * 20, "1\n", "22\n")], ByteTokenizer(), 8)
  assert cut == 1 and data["lengths"].tolist() == [[8, 8]]
  assert ByteTokenizer().decode(data["tokens"][0, 0]) == "xxxxxx1\n"


# ---- end to end: train.py reward, then rm:DIR ----

STEPS = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """`train.py reward` on addition pairs whose rejected answer has a digit dropped or doubled (the
  plausible carry/digit slips need arithmetic that a random-init model does not learn in a few dozen
  steps): -> (checkpoints dir, run dir, printed output)."""
  d = tmp_path_factory.mktemp("rm")
  task = AdditionTask(digits_min=1, digits_max=2)
  train_file = task.write_preference_file(str(d / "train.jsonl"), 4000, "train", mistakes=("typo",))
  held_file = task.write_preference_file(str(d / "heldout.jsonl"), 256, "heldout", mistakes=("typo",))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = train_cli.main(
      [
        "reward",
        "--data",
        train_file,
        f"reward.eval_data={held_file}",
        "--no-progress",
        f"--mesh={MESH}",
        "mesh.dp=8",
        "mesh.tp=1",
        *TINY,
        "model.d_model=128",
        "model.d_ff=256",
        f"train.steps={STEPS}",
        "train.batch_size=64",
        "train.warmup_steps=20",
        "train.eval_every=30",
        "train.save_every=0",
        f"train.out_dir={d / 'run'}",
      ]
    )
  assert rc == 0
  return str(d / "run" / "checkpoints"), d / "run", out.getvalue()


def test_cli_trains_a_reward_model_and_writes_a_checkpoint(trained):
  ckpt, run, printed = trained
  assert "held-out pair accuracy at step 0" in printed and f"reward model to step {STEPS}" in printed
  assert f"checkpoint: {ckpt}" in printed
  meta = read_meta(ckpt)
  assert meta["step"] == STEPS and meta["data"]["kind"] == "reward_model" and meta["data"]["heldout_pairs"] == 256
  lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
  assert [l["step"] for l in lines] == list(range(1, STEPS + 1))
  assert [l["step"] for l in lines if "heldout_acc" in l] == [30, 60]
  assert json.load(open(run / "config.json"))["reward"]["data"].endswith("train.jsonl")


def test_tiny_reward_model_learns_the_preference(trained):
  ckpt, run, _ = trained
  lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
  acc = read_meta(ckpt)["data"]["heldout_acc"]
  assert acc == lines[-1]["heldout_acc"] >= 0.7, f"held-out pair accuracy {acc}"  # measured: 0.996
  assert np.mean([l["loss"] for l in lines[-10:]]) < np.mean([l["loss"] for l in lines[:10]]) - 0.2


def test_rm_reward_through_spec_and_combine_prefers_correct_answers(trained):
  ckpt, _, _ = trained
  spec = RewardSpec.parse(f"exact_match:1.0,rm:{ckpt}:0.5")
  name = f"rm:{ckpt}"
  assert spec.weights == {"exact_match": 1.0, name: 0.5}
  task = AdditionTask(digits_min=1, digits_max=2)
  pairs = task.preference_pairs(48, "heldout", seed=11, mistakes=("typo",))
  prompts, refs = [p.prompt for p in pairs], [answer_line(p.chosen) for p in pairs]
  right_total, right = combine(spec, prompts, [p.chosen for p in pairs], refs)
  wrong_total, wrong = combine(spec, prompts, [p.rejected for p in pairs], refs)
  assert np.all((right[name] > 0) & (right[name] < 1)) and np.all((wrong[name] > 0) & (wrong[name] < 1))
  assert right[name].mean() > wrong[name].mean() + 0.3, (right[name].mean(), wrong[name].mean())
  assert right[name].mean() > 0.5 > wrong[name].mean()  # the offset centres held-out scores at 0
  np.testing.assert_allclose(right_total, 1.0 + 0.5 * right[name], rtol=1e-6)
  np.testing.assert_allclose(wrong_total, 0.5 * wrong[name], rtol=1e-6)
  # Scores do not depend on how the batch is cut: one sample alone scores the same.
  model = spec.terms[1][0].fn
  alone = model([prompts[3]], [pairs[3].chosen])
  np.testing.assert_allclose(alone, right[name][3:4], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    R.sigmoid(model.raw_scores(prompts[:5], [p.chosen for p in pairs[:5]])), right[name][:5], rtol=1e-5
  )


def test_rm_reward_errors_name_the_reward(tmp_path):
  with pytest.raises(ValueError, match=r"reward 'rm:.*nowhere': .*does not exist"):
    RewardSpec.parse(f"rm:{tmp_path / 'nowhere'}:0.5")


def test_rl_run_mixes_the_reward_model_with_the_verifiable_reward(trained, tmp_path):
  """`train.py rl` with rl.rewards=exact_match:1.0,rm:DIR:0.5 on a tiny policy: both terms are logged
  per step and the reward the learner used is their weighted sum."""
  ckpt, _, _ = trained
  name = f"rm:{ckpt}"
  rc = train_cli.main(
    [
      "rl",
      "--no-progress",
      f"--mesh={MESH}",
      "mesh.dp=8",
      "mesh.tp=1",
      *TINY,
      "model.max_seq_len=64",
      "train.steps=2",
      "train.lr=1e-3",
      "train.warmup_steps=0",
      "rl.group_size=4",
      "rl.prompts_per_step=4",
      "rl.max_new_tokens=4",
      "rl.eval_problems=16",
      "rl.eval_every=0",
      "serve.page_size=4",
      "serve.num_pages=256",
      f"rl.rewards=exact_match:1.0,{name}:0.5",
      f"train.out_dir={tmp_path}",
    ]
  )
  assert rc == 0
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if "reward" in json.loads(l)]
  assert [l["step"] for l in lines] == [1, 2]
  for l in lines:
    assert 0 < l[f"reward/{name}"] < 1
    assert l["reward"] == pytest.approx(l["reward/exact_match"] + 0.5 * l[f"reward/{name}"], rel=1e-5)


def test_divergence_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
  """A NaN/inf stops reward-model training as it stops pretraining and RL (jaxllm.train.runner)."""
  from jaxllm.train.runner import TrainingDiverged

  data = AdditionTask(digits_min=1, digits_max=2).write_preference_file(str(tmp_path / "p.jsonl"), 200, "train")
  cfg = load_config(
    [],
    [
      f"mesh={MESH}",
      "mesh.dp=8",
      "mesh.tp=1",
      *TINY,
      "train.seq_len=32",
      "train.batch_size=16",
      "train.steps=10",
      "train.save_every=1",
      "train.lr=1e38",
      "train.warmup_steps=0",
      "train.grad_clip=0",
      "train.weight_decay=0",
      f"reward.data={data}",
      f"train.out_dir={tmp_path / 'run'}",
    ],
  )
  with pytest.raises(TrainingDiverged, match="reward-model loss or gradient became NaN/inf at step") as e:
    R.train_reward_model(cfg, progress=False, log=lambda *_: None)
  meta = read_meta(str(tmp_path / "run" / "checkpoints"))
  assert f"(step {meta['step']}) is kept" in str(e.value) and meta["data"]["kind"] == "reward_model"
  model = R.RewardModel.load(str(tmp_path / "run" / "checkpoints"))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model.params))
