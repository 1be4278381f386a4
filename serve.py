"""Serving CLI.

  python serve.py [--checkpoint DIR | --hf DIR] [--config F.toml] [--mesh M.toml] [serve.key=value ...]
      the HTTP server (OpenAI /v1/completions, /v1/chat/completions, /v1/models; native /generate;
      /metrics, /health, /health/live, /flush_cache) on serve.host:serve.port; SIGTERM drains. Without
      --checkpoint/--hf it serves the newest checkpoint of `python train.py` (runs/default/checkpoints).
  python serve.py generate (--checkpoint DIR | --hf DIR) --prompt "Once upon" [--prompt ...]
                          [--max-tokens 32 --mesh meshes/cpu-8.toml serve.attention=pallas ...]
  python serve.py bench [--groups 8 --per-group 8 --system-len 128 --question-len 16 --output-len 16
                         --arrival all|poisson --rate 50 --model tiny | --hf DIR] [--mesh ...] [serve.key=value]

Engine settings are ServeConfig's serve.* keys everywhere (python serve.py --help lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxllm import cli


def _engine_args(p):
  p.add_argument(
    "overrides",
    nargs="*",
    help="serve.key=value engine settings, e.g. serve.page_size=8 "
    "serve.attention=pallas (python serve.py --help lists them)",
  )
  p.add_argument("--config", action="append", default=[], help="TOML file(s) with a [serve] table")
  p.add_argument(
    "--mesh", default=None, help="mesh preset file (meshes/NAME.toml) to serve over, e.g. tp=2; pp must be 1"
  )
  p.add_argument(
    "--hf",
    default=None,
    metavar="DIR",
    help="Hugging Face model directory (config.json, "
    "safetensors, tokenizer.json) to serve instead of a training checkpoint",
  )


def _mesh(path):
  """(mesh, plan) from a mesh preset file, on the first dp*tp devices; (None, None) without one."""
  if path is None:
    return None, None
  import jax

  from jaxllm.config import load_config
  from jaxllm.parallel import build_mesh

  mc = load_config([], [f"mesh={path}"]).mesh
  if mc.num_devices > jax.device_count():
    raise SystemExit(
      f"--mesh {path} needs {mc.num_devices} devices but jax sees {jax.device_count()} "
      f"({jax.devices()[0].platform}); pick a smaller mesh preset"
    )
  return build_mesh(mc, jax.devices()[: mc.num_devices])


def _load(path, mesh, plan, **kw):
  """jaxllm.io.load_model of a checkpoints folder or a Hugging Face directory, placed on the mesh if any;
  a path that does not load ends the program with the loader's message."""
  from jaxllm.io import load_model
  from jaxllm.io.checkpoint import CheckpointError

  shardings = None
  if mesh is not None:
    from jaxllm.parallel import param_shardings

    shardings = lambda mdef: param_shardings(mdef, mesh, plan)
  try:
    return load_model(path, shardings=shardings, **kw)
  except (CheckpointError, ValueError) as e:
    cli.fail(str(e))


def _serve_cfg(a):
  from jaxllm.config import ConfigError, load_config

  try:
    return load_config(a.config, a.overrides).serve
  except ConfigError as e:
    cli.fail(str(e))


def generate(a):
  from jaxllm.serve.engine import Engine
  from jaxllm.serve.sampling import SamplingParams

  mesh, plan = _mesh(a.mesh)
  if a.hf and a.checkpoint:
    raise SystemExit("give either --checkpoint or --hf, not both")
  if a.hf or a.checkpoint:
    m = _load(a.hf or a.checkpoint, mesh, plan, tokenizer=a.tokenizer)
    cfg, params, tok, stops, defaults = m.cfg, m.params, m.tokenizer, m.eos_ids, m.request_defaults
  else:
    from jaxllm.config import MODEL_PRESETS
    from jaxllm.data import load_tokenizer
    from jaxllm.io import eos_ids
    from jaxllm.model.params import init_params

    print(f"no --checkpoint or --hf: random {a.model} weights (output is noise)", file=sys.stderr)
    cfg = MODEL_PRESETS[a.model]
    params = init_params(cfg, 0)
    tok = load_tokenizer(a.tokenizer or "byte")
    stops, defaults = eos_ids(cfg.vocab_size, tok), {}
  # A flag left out takes the model's generation_config.json default, else the CLI's (greedy).
  given = lambda name, default: getattr(a, name) if getattr(a, name) is not None else defaults.get(name, default)
  # As /v1/completions encodes a prompt: with the tokenizer's own BOS unless the model says otherwise.
  add_special = defaults.get("add_special_tokens", True)
  prompts = [tok.encode_prompt(p) if add_special else tok.encode(p) for p in a.prompt]
  eng = Engine(cfg, params, _serve_cfg(a), mesh=mesh, plan=plan, detokenize=tok.decode)
  sp = SamplingParams(
    max_tokens=given("max_tokens", 64),
    temperature=given("temperature", 0.0),
    top_k=given("top_k", 0),
    top_p=given("top_p", 1.0),
    min_p=given("min_p", 0.0),
    repetition_penalty=defaults.get("repetition_penalty", 1.0),
    seed=a.seed,
    stop_token_ids=stops,
    stop=tuple(a.stop),
  )
  for prompt, r in zip(a.prompt, eng.generate(prompts, sp)):
    print(f"--- {prompt!r} [{r.finish_reason}, {len(r.output)} tokens, cache hit {r.cache_hit}]")
    print(prompt + tok.decode(r.output))


def bench(a):
  from jaxllm.buckets import pow2_bucket
  from jaxllm.config import MODEL_PRESETS
  from jaxllm.model.params import init_params
  from jaxllm.serve.bench import Workload, run_bench

  w = Workload(a.groups, a.per_group, a.system_len, a.question_len, a.output_len, a.arrival, a.rate, a.seed)
  need = a.system_len + a.question_len + a.output_len
  max_seq_len = pow2_bucket(need)  # page tables sized for the workload
  mesh, plan = _mesh(a.mesh)
  if a.hf:
    m = _load(a.hf, None, None, tokenizer="byte", max_seq_len=max_seq_len)  # the engine places it; no text
    cfg, params = m.cfg, m.params
  else:
    cfg = dataclasses.replace(MODEL_PRESETS[a.model], max_seq_len=max_seq_len)
    params = init_params(cfg, 0)
  run_bench(cfg, params, w, _serve_cfg(a), mem_pages=a.mem_pages, mesh=mesh, plan=plan)


SUBCOMMANDS = ("generate", "bench")


def _server_parser():
  p = argparse.ArgumentParser(
    prog="serve.py",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="config keys (serve.key=value, or a [serve] table in --config):\n" + cli.config_help(("serve",)),
  )
  p.add_argument("overrides", nargs="*", help="serve.key=value overrides, e.g. serve.port=8001 serve.num_pages=512")
  p.add_argument("--checkpoint", help="training checkpoint directory (train.out_dir/checkpoints of a run)")
  p.add_argument(
    "--hf", metavar="DIR", help="Hugging Face model directory (config.json, safetensors, tokenizer.json, chat template)"
  )
  p.add_argument("--config", action="append", default=[], help="TOML file(s) with a [serve] table")
  p.add_argument("--mesh", default=None, help="mesh preset file (meshes/NAME.toml) to serve over; pp must be 1")
  return p


def serve_http(argv) -> None:
  """The default action: the HTTP server (logic in jaxllm.serve.http.server)."""
  a = _server_parser().parse_intermixed_args(argv)  # options and key=value overrides in any order
  if a.mesh and "jax" not in sys.modules:
    cli.prepare_devices(a.mesh)
  not_serve = [o for o in a.overrides if not o.split("=", 1)[0].strip().lstrip("-").startswith("serve.")]
  if not_serve:
    cli.fail(
      f"{not_serve[0]!r}: only serve.key=value overrides apply here (the model and its settings come "
      "with --checkpoint / --hf); see --help for the keys"
    )
  from jaxllm.config import ConfigError, load_config
  from jaxllm.io.checkpoint import CheckpointError
  from jaxllm.serve.http.server import NoModel, load_model, serve

  cli.enable_compile_cache()
  try:
    serve_cfg = load_config(a.config, a.overrides).serve
    mesh, plan = _mesh(a.mesh)
    model = load_model(a.checkpoint, a.hf, mesh, plan)
  except (ConfigError, CheckpointError, NoModel, FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  serve(model, serve_cfg, mesh, plan)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in SUBCOMMANDS:
    return serve_http(argv)
  cmd, argv = argv[0], argv[1:]
  epilog = "config keys (serve.key=value, or a [serve] table in --config):\n" + cli.config_help(("serve",))
  sub = lambda name, help: argparse.ArgumentParser(
    prog=f"serve.py {name}", description=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  g = sub("generate", "offline generation from a training checkpoint, an HF directory or random weights")
  g.add_argument("--checkpoint", help="training checkpoint directory (any training mesh)")
  g.add_argument("--model", default="tiny", help="preset for random weights when no --checkpoint")
  g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  g.add_argument(
    "--tokenizer",
    default=None,
    help="'byte', or a tokenizer.json / directory (default: the "
    "model's own: the checkpoint's train.tokenizer or the --hf directory's tokenizer.json; byte for "
    "random weights)",
  )
  model_default = "(default: the model's generation_config.json value, else %s)"
  g.add_argument("--max-tokens", type=int, default=None, help=model_default % 64)
  g.add_argument("--temperature", type=float, default=None, help=model_default % "0: greedy")
  g.add_argument("--top-k", type=int, default=None, help=model_default % "0: off")
  g.add_argument("--top-p", type=float, default=None, help=model_default % 1.0)
  g.add_argument("--min-p", type=float, default=None, help=model_default % 0.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  _engine_args(g)
  b = sub("bench", "shared-prefix workload: cache off vs on, every policy, memory limit")
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
  a = {"generate": g, "bench": b}[cmd].parse_intermixed_args(argv)  # options and key=value in any order
  if a.mesh and "jax" not in sys.modules:
    cli.prepare_devices(a.mesh)  # CPU mesh presets need their emulated devices before jax starts
  cli.enable_compile_cache()
  {"generate": generate, "bench": bench}[cmd](a)


if __name__ == "__main__":
  cli.tune_malloc()
  main()
