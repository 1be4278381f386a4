"""Serving CLI.

  python serve.py generate --checkpoint DIR --prompt "Once upon" [--prompt ...] [--max-tokens 32 ...]
  python serve.py bench [--groups 8 --per-group 8 --system-len 128 --question-len 16 --output-len 16
                         --arrival all|poisson --rate 50 --model tiny]

The HTTP server comes later; with no subcommand this prints help.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def _engine_args(p):
  p.add_argument("--attention", default="reference", choices=["reference", "pallas"],
                 help="paged attention backend (reference = pure jnp, the CPU default)")
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--max-running", type=int, default=16, help="sequences decoded together")
  p.add_argument("--chunk-size", type=int, default=256, help="prefill token budget per step")


def _mesh(path):
  if path is None:
    return None, None
  from jaxllm.config import mesh_from_toml
  from jaxllm.parallel import build_mesh
  return build_mesh(mesh_from_toml(path))


def generate(a):
  import jax
  from jaxllm.data import load_tokenizer
  from jaxllm.serve.engine import Engine
  from jaxllm.serve.sampling import SamplingParams
  mesh, plan = _mesh(a.mesh)
  if a.checkpoint:
    from jaxllm.train.checkpoint import load_params
    config, params = load_params(a.checkpoint)
    cfg = config.model
    params = jax.device_get(params)      # from the checkpoint's layout to host; the engine places it
  else:
    from jaxllm.config import MODEL_PRESETS
    from jaxllm.model.params import init_params
    print(f"no --checkpoint: random {a.model} weights (output is noise)", file=sys.stderr)
    cfg = MODEL_PRESETS[a.model]
    params = init_params(cfg, 0)
  tok = load_tokenizer(a.tokenizer)
  pages = a.num_pages or a.max_running * -(-cfg.max_seq_len // a.page_size)
  eng = Engine(cfg, params, page_size=a.page_size, num_pages=pages, max_running=a.max_running,
               chunk_size=a.chunk_size, attention=a.attention, mesh=mesh, plan=plan,
               detokenize=tok.decode)
  stops = (tok.eos_id,) if getattr(tok, "eos_id", None) is not None else ()
  sp = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                      min_p=a.min_p, seed=a.seed, stop_token_ids=stops, stop=tuple(a.stop))
  for prompt, r in zip(a.prompt, eng.generate([tok.encode(p) for p in a.prompt], sp)):
    print(f"--- {prompt!r} [{r.finish_reason}, {len(r.output)} tokens, cache hit {r.cache_hit}]")
    print(prompt + tok.decode(r.output))


def bench(a):
  from jaxllm.config import MODEL_PRESETS
  from jaxllm.model.params import init_params
  from jaxllm.serve.bench import Workload, run_bench
  w = Workload(a.groups, a.per_group, a.system_len, a.question_len, a.output_len, a.arrival, a.rate, a.seed)
  cfg = MODEL_PRESETS[a.model]
  need = a.system_len + a.question_len + a.output_len
  cfg = dataclasses.replace(cfg, max_seq_len=max(need, 1 << (need - 1).bit_length()))
  run_bench(cfg, init_params(cfg, 0), w, page_size=a.page_size, max_running=a.max_running,
            chunk_size=a.chunk_size, mem_pages=a.mem_pages, attention=a.attention)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd")
  g = sub.add_parser("generate", help="offline generation from a training checkpoint")
  g.add_argument("--checkpoint", help="training checkpoint directory (any training mesh)")
  g.add_argument("--model", default="tiny", help="preset for random weights when no --checkpoint")
  g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  g.add_argument("--tokenizer", default="byte")
  g.add_argument("--max-tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0)
  g.add_argument("--top-k", type=int, default=0)
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--min-p", type=float, default=0.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  g.add_argument("--mesh", default=None, help="mesh TOML (meshes/*.toml) to serve over, e.g. tp=2")
  g.add_argument("--num-pages", type=int, default=0, help="KV pool pages (0: max_running full sequences)")
  _engine_args(g)
  b = sub.add_parser("bench", help="shared-prefix workload: cache off vs on, every policy, memory limit")
  b.add_argument("--model", default="tiny")
  b.add_argument("--groups", type=int, default=8)
  b.add_argument("--per-group", type=int, default=8)
  b.add_argument("--system-len", type=int, default=128)
  b.add_argument("--question-len", type=int, default=16)
  b.add_argument("--output-len", type=int, default=16)
  b.add_argument("--arrival", default="all", choices=["all", "poisson"])
  b.add_argument("--rate", type=float, default=50.0, help="requests/s for poisson arrivals")
  b.add_argument("--seed", type=int, default=0)
  b.add_argument("--mem-pages", type=int, default=0, help="page limit of the eviction runs (0: auto)")
  _engine_args(b)
  a = ap.parse_args(argv)
  if a.cmd is None:
    ap.print_help()
    return
  if getattr(a, "mesh", None) and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    # CPU mesh presets need the emulated devices before jax starts (no effect on GPU/TPU).
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  {"generate": generate, "bench": bench}[a.cmd](a)


if __name__ == "__main__":
  main()
