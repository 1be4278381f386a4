"""SFT through the trainer: prompt / template tokens add exactly nothing to the loss or the gradients
(against a hand-built mask), and a short SFT run (prompt/completion and messages rows, some too long)
logs its truncation count and, killed and resumed, equals the uninterrupted run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig, load_config
from jaxllm.data import ByteTokenizer, PackedBatches, Row, build_stream
from jaxllm.model.loss import chunked_cross_entropy_sums, token_nll
from jaxllm.model.params import init_params, model_def
from jaxllm.train.loop import train
from jaxllm.train.step import grads_and_metrics

SMALL = ModelConfig(name="t", vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
EOS = ByteTokenizer.eos_id
MESHES = os.path.join(os.path.dirname(__file__), "..", "..", "meshes")


def _sft_batch():
  """Two sequences of T=32 from a prompt/completion row and a messages row (default template), and the
  loss mask written by hand from the rule: the completion and its eos; the assistant's " yo", its eos
  and the newline the template puts after it. (Row 2 does not fit after row 1, so it starts sequence 2.)"""
  T, prompt, asked = 32, "12+30=", "user: hi\nassistant:"
  chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  rows = [Row("completion", (prompt, "42\n"), "f:1"), Row("messages", chat, "f:2")]
  stream, _ = build_stream(rows * 2, ByteTokenizer(), T)
  batch = next(PackedBatches(stream.tokens, T, 2, shuffle=False, eos_id=EOS, **stream.streams()))
  hand = np.zeros((2, T), np.int32)
  hand[0, len(prompt) - 1 : len(prompt) - 1 + len("42\n") + 1] = 1  # mask[t] is the loss of target t + 1
  hand[1, len(asked) - 1 : len(asked) - 1 + len(" yo") + 2] = 1
  return batch, hand


def test_masked_positions_add_exactly_nothing_to_loss_and_grads():
  batch, hand = _sft_batch()
  assert np.array_equal(batch["mask"], hand), batch["mask"]
  mdef, params = model_def(SMALL), init_params(SMALL, 0)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  grads, metrics = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, b)

  def reference(p):  # full logits, per-token NLL, the hand-built mask
    model = mdef.bind(p)
    h, _, _ = model.hidden(b["inputs"], segment_ids=b["segment_ids"])
    nll = token_nll(model.logits(h), b["targets"])
    return jnp.sum(nll * hand) / hand.sum()

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
  assert float(metrics["tokens"]) == hand.sum()
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6), grads, ref_grads)
  # Other targets at the masked positions: bit-identical loss and gradients.
  rng = np.random.default_rng(0)
  other = np.where(hand == 1, batch["targets"], rng.integers(0, 256, hand.shape)).astype(np.int32)
  assert (other != batch["targets"]).sum() > 40
  grads2, metrics2 = jax.jit(lambda p, b: grads_and_metrics(mdef, p, b))(params, {**b, "targets": jnp.asarray(other)})
  assert float(metrics2["loss"]) == float(metrics["loss"])
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), grads2, grads)
  # The loss's gradient w.r.t. each position's final hidden state is exactly 0 where the mask is 0.
  model = mdef.bind(params)
  h, _, _ = model.hidden(b["inputs"], segment_ids=b["segment_ids"])
  dh = jax.grad(lambda h: chunked_cross_entropy_sums(h, model.head_weight(), b["targets"], b["mask"], 8)[0])(h)
  assert np.all(np.asarray(dh)[hand == 0] == 0) and np.all(np.abs(np.asarray(dh)[hand == 1]).sum(-1) > 0)


def _sft_file(path):
  """Addition as prompt/completion rows and as chats, and a few rows too long for seq_len=64."""
  rng = np.random.default_rng(0)
  rows = []
  for i in range(240):
    a, b = (int(x) for x in rng.integers(0, 100, 2))
    if i % 3:
      rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}\n"})
    else:
      chat = [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
      rows.append({"messages": chat})
    if i % 40 == 0:
      rows.append({"prompt": "long " * 20, "completion": "x"})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _cfg(out, data, *extra):
  return load_config(
    [],
    [
      f"mesh={os.path.join(MESHES, 'cpu-8.toml')}",
      "model=tiny",
      "model.n_layers=2",
      "model.d_model=64",
      "model.d_ff=128",
      "train.seq_len=64",
      "train.batch_size=8",
      "train.warmup_steps=2",
      "train.eval_every=4",
      "train.eval_batches=1",
      "train.sample_tokens=0",
      "train.log_every=2",
      "train.document_masks=true",
      f"train.data={data}",
      f"train.out_dir={out}",
      *extra,
    ],
  )


def test_sft_run_logs_truncation_and_resumes_exactly(tmp_path):
  data = _sft_file(tmp_path / "sft.jsonl")
  lines = []
  full = train(_cfg(tmp_path / "full", data, "train.steps=8", "train.save_every=4"), progress=False, log=lines.append)
  (summary,) = [line for line in lines if line.startswith("data: ")]
  assert "80 messages rows" in summary and "6 truncated, 0 dropped (train.long_rows=truncate)" in summary, summary
  assert "6 truncated rows kept no completion token" in summary
  part = _cfg(tmp_path / "part", data, "train.steps=8", "train.save_every=4")
  first = train(part, stop_after=6, progress=False, log=lambda *_: None)
  second = train(part, progress=False, log=lambda *_: None)
  assert first["steps"] == 6 and second["history"][0]["step"] == 5  # resumed from the step-4 checkpoint
  want = {h["step"]: h for h in full["history"]}
  for h in first["history"] + second["history"]:
    assert h["loss"] == pytest.approx(want[h["step"]]["loss"], rel=1e-5), h
  assert second["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
  dropped = []
  train(_cfg(tmp_path / "drop", data, "train.steps=1", "train.long_rows=drop"), progress=False, log=dropped.append)
  assert any("0 truncated, 6 dropped (train.long_rows=drop)" in line for line in dropped)
