"""Evaluation on held-out RL rows: greedy accuracy and pass@k, during RL (`rl.eval_data`, `rl.eval_k`)
and standalone for any model the engine serves:

  python -m jaxllm.rl.eval --model (HF dir | checkpoints dir) --data FILE.jsonl --rewards math --k 8

A completion is correct when the first reward of the spec scores it >= 1 (the verifiable rewards
score 0 or 1). Accuracy is that of the greedy completions; pass@k is the fraction of rows with at
least one correct completion among k samples at the rollout temperature (Chen et al. 2021, "Evaluating
Large Language Models Trained on Code", with n = k samples), with its standard error over rows. Mean
length counts generated tokens; truncated is the fraction of completions cut by the length limit.
"""

from __future__ import annotations

import numpy as np

from jaxllm.rl import data as rl_data
from jaxllm.rl.rewards import RewardSpec, combine
from jaxllm.serve import SamplingParams


def unescape(text: str) -> str:
  """A stop string from the command line: \\n, \\t and \\\\ escapes become the characters."""
  out, i = [], 0
  while i < len(text):
    if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
      out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
      i += 2
    else:
      out.append(text[i])
      i += 1
  return "".join(out)


def evaluate(
  engine,
  tokenizer,
  rows: list[dict],
  spec: RewardSpec,
  max_new_tokens: int,
  stop=(),
  stop_token_ids=(),
  k: int = 0,
  temperature: float = 1.0,
  seed: int = 0,
  chat_template=None,
) -> dict:
  """-> {"accuracy", "mean_len", "truncated"} of greedy completions, plus {"pass_at_k", "pass_at_k_se",
  "k"} when k > 0. Deterministic given the engine's weights and `seed`."""
  ids = [rl_data.prompt_ids(r, tokenizer, chat_template) for r in rows]

  def correct(outs, rows_):
    completions = [tokenizer.decode(o.output) for o in outs]
    _, per = combine(spec, [rl_data.prompt_text(r) for r in rows_], completions, rows_)
    return per[spec.terms[0][0].name] >= 1.0

  greedy = SamplingParams(
    max_tokens=max_new_tokens, temperature=0.0, stop=tuple(stop), stop_token_ids=tuple(stop_token_ids)
  )
  outs = engine.generate(ids, greedy)
  ok = correct(outs, rows)
  out = {
    "accuracy": float(np.mean(ok)),
    "mean_len": float(np.mean([len(o.output) for o in outs])),
    "truncated": float(np.mean([o.finish_reason == "length" for o in outs])),
  }
  if k:
    sps = [
      SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        stop=tuple(stop),
        stop_token_ids=tuple(stop_token_ids),
        seed=(seed * 1_000_003 + i * k + j) & 0x7FFFFFFF,
      )
      for i in range(len(rows))
      for j in range(k)
    ]
    samples = engine.generate([p for p in ids for _ in range(k)], sps)
    hit = correct(samples, [r for r in rows for _ in range(k)]).reshape(len(rows), k).any(axis=1)
    out.update(
      k=k,
      pass_at_k=float(hit.mean()),
      pass_at_k_se=float(hit.std(ddof=1) / np.sqrt(len(rows))) if len(rows) > 1 else 0.0,
    )
  return out


def main(argv=None) -> int:
  """Greedy accuracy and pass@k of a model on jsonl rows (jaxllm.rl.data) under a reward spec."""
  import argparse
  import sys

  p = argparse.ArgumentParser(prog="python -m jaxllm.rl.eval", description=main.__doc__)
  p.add_argument("--model", required=True, help="a Hugging Face directory or a training run's checkpoints dir")
  p.add_argument("--data", required=True, help="jsonl rows {prompt|messages, ...fields} (files, dirs, globs)")
  p.add_argument("--rewards", default="exact_match", help="reward spec (as rl.rewards); the first decides correct")
  p.add_argument("--k", type=int, default=0, help="samples per row for pass@k (0: greedy accuracy only)")
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=1.0, help="of the pass@k samples")
  p.add_argument("--stop", action="append", default=[], help="a stop string besides EOS (\\n escapes work)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows")
  args = p.parse_args(argv)
  from jaxllm.io import load_model
  from jaxllm.io.checkpoint import CheckpointError
  from jaxllm.serve import Engine

  try:
    spec = RewardSpec.parse(args.rewards)
    rows = rl_data.load_rows(args.data)[: args.limit or None]
    model = load_model(args.model)
    chat = rl_data.chat_renderer(model.chat_template, model.tokenizer) if any("messages" in r for r in rows) else None
    engine = Engine(model.cfg, model.params, max_running=64, detokenize=model.tokenizer.decode)
    res = evaluate(
      engine,
      model.tokenizer,
      rows,
      spec,
      args.max_new_tokens,
      [unescape(s) for s in args.stop],
      model.eos_ids,
      args.k,
      args.temperature,
      args.seed,
      chat,
    )
  except (ValueError, CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{len(rows)} rows, reward {spec.terms[0][0].name}")
  print(f"accuracy (greedy)   {100 * res['accuracy']:.1f}%")
  if args.k:
    print(f"pass@{args.k:<13} {100 * res['pass_at_k']:.1f}% +- {100 * res['pass_at_k_se']:.1f}")
  print(f"mean length         {res['mean_len']:.1f} tokens")
  print(f"truncated           {100 * res['truncated']:.1f}%")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
