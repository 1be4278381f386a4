"""Offline text completion through the serving engine: what the trainer's end-of-run sample and
other one-shot callers use instead of a second generate path.

A training mesh may be pipelined; the engine serves without pipeline stages, so `serving_mesh`
folds the pp stages into data parallelism over the same devices (the weights are resharded once,
layer stacks replicated over the former stages, tp/ep sharding kept).
"""

from __future__ import annotations

import dataclasses

from jaxllm.config import ModelConfig
from jaxllm.io.load import eos_ids as model_eos_ids
from jaxllm.parallel import build_mesh
from jaxllm.parallel.mesh import MeshPlan
from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams


def serving_mesh(mesh, plan: MeshPlan | None):
  """(mesh, plan) to serve on: the given one when pp == 1, else the same devices with pp folded
  into dp (no pipeline stages in serving)."""
  if mesh is None or plan.cfg.pp == 1:
    return mesh, plan
  mc = dataclasses.replace(
    plan.cfg,
    name=f"{plan.cfg.name}-serve",
    pp=1,
    vpp=1,
    microbatches=1,
    dp=plan.cfg.pp * plan.cfg.dp,
    dcn_pp=1,
    dcn_dp=plan.cfg.dcn_pp * plan.cfg.dcn_dp,
  )
  return build_mesh(mc, list(mesh.devices.flat))


def complete_text(
  cfg: ModelConfig,
  params,
  tokenizer,
  prompt: str,
  max_tokens: int,
  temperature: float = 0.8,
  seed: int = 0,
  mesh=None,
  plan: MeshPlan | None = None,
  page_size: int = 16,
  eos_ids: tuple | None = None,
) -> str:
  """prompt + its continuation of `max_tokens` tokens (fewer at an end-of-sequence token), generated
  by the engine on `mesh` (None: one device). eos_ids: every end-of-sequence id (a loaded model's
  LoadedModel.eos_ids); None: the tokenizer's."""
  ids = tokenizer.encode(prompt)
  mesh, plan = serving_mesh(mesh, plan)
  pages = -(-(len(ids) + max_tokens) // page_size) + 1
  eng = Engine(
    cfg, params, page_size=page_size, num_pages=pages, max_running=1, mesh=mesh, plan=plan, detokenize=tokenizer.decode
  )
  stops = model_eos_ids(cfg.vocab_size, tokenizer) if eos_ids is None else tuple(eos_ids)
  sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, stop_token_ids=stops)
  out = eng.generate([ids], sp)[0]
  return prompt + tokenizer.decode(out.output)
