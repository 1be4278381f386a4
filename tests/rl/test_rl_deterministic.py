"""On-policy RL in batch-invariant arithmetic (model.batch_invariant, jaxllm.model.invariant), run as a
user runs it (`train.py rl` on the one-device mesh, and on tp=2): the sampler's log-probs of the drawn tokens equal
the learner's recomputation under the same weights bit for bit, on every step (logp_gap_max == 0.0),
at eta 0 and eta 1, with G=16 and the addition task's prompts of varied lengths; so
rl.behaviour_logprobs=sampler is exact with the second forward turned off (rl.rescore=false).
(eta 1 and tp=2 are marked slow: 25-50 s each; tests/serve/test_deterministic_mesh.py checks the
engine and the learner on tp=2 in the default suite.)"""

import json
import os

import pytest
from test_rl_demo import cli
from test_rl_loop import TINY_MODEL

TINY = TINY_MODEL + [
  "model.batch_invariant=true",
  "train.steps=3",
  "train.lr=1e-3",
  "train.warmup_steps=0",
  "rl.group_size=16",
  "rl.prompts_per_step=2",
  "rl.max_new_tokens=6",
  "rl.eval_every=0",
  "rl.behaviour_logprobs=sampler",
  "serve.page_size=16",
  "serve.num_pages=128",
]


@pytest.mark.parametrize(
  "eta, mesh",
  [(0, []), pytest.param(0, ["mesh.tp=2"], marks=pytest.mark.slow), pytest.param(1, [], marks=pytest.mark.slow)],
  ids=["eta0", "eta0-tp2", "eta1"],
)
def test_sampler_logprobs_equal_the_learner_bit_for_bit(tmp_path, eta, mesh):
  """eta 0 without the second forward (rl.rescore=false): the learner's proximal pass, which the loss
  needs anyway, recomputes the sampler's log-probs under the same weights (logp_gap_fresh_max); on one
  device and on tp=2, where the engine and the learner run per device (jaxllm.parallel.invariant_tp).
  eta 1 with it: the generation thread's rescoring under the weights that sampled (logp_gap_max)."""
  on = [f"rl.eta={eta}", f"rl.rescore={str(eta == 1).lower()}", f"train.out_dir={tmp_path}", *mesh]
  cli("rl", *TINY, *on, cwd=tmp_path)
  lines = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  steps = [line for line in lines if "reward" in line]
  assert [line["step"] for line in steps] == [1, 2, 3]
  if eta == 0:  # every sample fresh: behaviour = proximal bit for bit, importance weights exactly 1
    assert all(line["logp_gap_fresh_max"] == 0.0 and line["is_weight"] == 1.0 for line in steps)
    assert all("logp_gap_max" not in line for line in steps)  # no rescoring forward ran
  else:
    assert all(line["logp_gap_max"] == 0.0 and line["logp_gap_mean"] == 0.0 for line in steps)
