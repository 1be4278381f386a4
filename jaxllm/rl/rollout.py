"""Rollouts: the serving engine (jaxllm.serve, in-process) generates G samples per prompt.

A GRPO group is G requests for one prompt; the engine's radix cache computes the prompt's KV once and
the other samples reuse its pages (prefix dedup). Each sample keeps the token ids it was given and
generated (never retokenized), the behaviour log-probs the sampler reported, and the weight version
that generated it (bound at admission). The sampler reports log-probs with logprobs_mode="processed":
of the distribution each token was drawn from (the model's at the rollout temperature; no top-k/top-p
here), which is the policy the learner's loss evaluates (jaxllm/rl/learner.py).

A rollout is plain data (ids, floats, strings): `to_json` / `from_json` write and read it exactly
(Python floats round-trip), so rollouts generated ahead of the learner are saved with a checkpoint.

Shapes: the package legend in jaxllm/__init__.py (B samples = prompts * G, T tokens).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from jaxllm.rl import data as rl_data
from jaxllm.serve import Engine, SamplingParams


@dataclass
class Sample:
  prompt_ids: list
  completion_ids: list
  logprobs: list  # behaviour log-prob of each completion token
  version: object  # weight version that generated it
  prompt: str  # the prompt as text (a chat row: its last user message), for rewards and logs
  completion: str
  row: dict  # the data row (prompt or messages, answer, any other fields): what the rewards receive
  cache_hit: int  # prompt tokens reused from the radix cache
  learner_logprobs: list | None = None  # the same tokens' log-probs by the learner's forward, same weights
  truncated: bool = False  # cut by rl.max_new_tokens before a stop
  reward: float | None = None  # the combined reward, when scored at generation (rl.filter_groups)
  reward_terms: dict | None = None  # {reward name: unweighted score}, with `reward`


@dataclass
class Rollout:
  samples: list  # prompts_per_step * G samples, each group adjacent
  step: int  # which learner step it is for
  seconds: float
  version: object  # the oldest weight version among its samples
  filtered: int = 0  # groups dropped by rl.filter_groups (all rewards equal)
  tries: int = 1  # generation rounds it took

  def to_json(self) -> dict:
    return {
      "samples": [dataclasses.asdict(x) for x in self.samples],
      "step": self.step,
      "seconds": self.seconds,
      "version": self.version,
      "filtered": self.filtered,
      "tries": self.tries,
    }

  @classmethod
  def from_json(cls, d: dict) -> "Rollout":
    def sample(x):
      if "reference" in x:  # written before rows: the task's answer
        x = {
          **{k: v for k, v in x.items() if k != "reference"},
          "row": {"prompt": x["prompt"], "answer": x["reference"]},
        }
      return Sample(**x)

    return cls(
      [sample(x) for x in d["samples"]], d["step"], d["seconds"], d["version"], d.get("filtered", 0), d.get("tries", 1)
    )


def generate(
  engine: Engine,
  tokenizer,
  rows: list[dict],
  group_size: int,
  max_new_tokens: int,
  temperature: float,
  seed: int,
  step: int,
  stop=(),
  stop_token_ids=(),
  chat_template=None,
) -> Rollout:
  """G samples for every row's prompt; deterministic given (seed, step) and the engine's weights."""
  t0 = time.perf_counter()
  reqs = []
  for i, row in enumerate(rows):
    ids = rl_data.prompt_ids(row, tokenizer, chat_template)
    for g in range(group_size):
      sp = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        logprobs=True,
        logprobs_mode="processed",
        stop=tuple(stop),
        stop_token_ids=tuple(stop_token_ids),
        seed=(seed * 1_000_003 + step * 65_537 + i * group_size + g) & 0x7FFFFFFF,
      )
      reqs.append((engine.add_request(ids, sp), row))
  engine.run()
  samples = [
    Sample(
      r.prompt,
      list(r.output),
      list(r.logprobs),
      r.extra_key,
      rl_data.prompt_text(row),
      tokenizer.decode(r.output),
      row,
      r.cache_hit,
      truncated=r.finish_reason == "length",
    )
    for r, row in reqs
  ]
  return Rollout(samples, step, time.perf_counter() - t0, min((s.version for s in samples), default=None))
