"""What batch invariance costs (serve.deterministic / model.batch_invariant, jaxllm.model.invariant),
side by side in one run: output tokens/s of the engine's greedy decode and tokens/s of the RL learner's
log-prob pass (rl.learner.token_logps on [B, T], the pass that runs in the engine's arithmetic; RL's
update itself takes the ordinary path either way) with the mode off and on, at batch 1, 8 and 32.

The engine: B requests of --prompt tokens decode --new tokens each (ignore_eos), serve's defaults
otherwise (decode_steps=8, overlap); tokens/s = B x new / wall of Engine.generate (prefill included),
best of --reps after a warm-up call. The learner: token_logps of B x --seq tokens at temperature 1,
best of --reps. fp32, one device.

  python benchmarks/bench_deterministic.py
  python benchmarks/bench_deterministic.py --layers 4 --d-model 256 --vocab 32000
  python benchmarks/bench_deterministic.py --batches 8 --max-seq 2048   # a wide page table
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.config import ModelConfig, ServeConfig  # noqa: E402
from jaxllm.model.params import init_params, model_def  # noqa: E402
from jaxllm.rl.learner import token_logps  # noqa: E402
from jaxllm.serve import Engine  # noqa: E402
from jaxllm.serve.sampling import SamplingParams  # noqa: E402


def best(fn, reps: int) -> float:
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def engine_rate(cfg, params, B: int, args) -> float:
  serve = ServeConfig(max_running=max(B, 1), num_pages=1024, page_size=16, radix=False)
  eng = Engine(cfg, params, serve)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(0, cfg.vocab_size, args.prompt)) for _ in range(B)]
  sp = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
  return B * args.new / best(lambda: eng.generate(prompts, sp), args.reps)


def learner_rate(cfg, params, B: int, args) -> float:
  mdef = model_def(cfg)
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, args.seq + 1)), jnp.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  return B * args.seq / best(lambda: jax.block_until_ready(token_logps(mdef, params, batch)), args.reps)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--prompt", type=int, default=32, help="engine: prompt tokens")
  p.add_argument("--new", type=int, default=64, help="engine: output tokens per request")
  p.add_argument("--seq", type=int, default=128, help="learner: tokens per row")
  p.add_argument("--max-seq", type=int, default=0, help="model.max_seq_len (the page table's width; 0: just enough)")
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  cfg = ModelConfig(
    name="bench",
    n_layers=args.layers,
    d_model=args.d_model,
    n_heads=4,
    n_kv_heads=2,
    d_ff=4 * args.d_model,
    vocab_size=args.vocab,
    max_seq_len=args.max_seq or max(args.prompt + args.new, args.seq) + 16,
  )
  params = jax.jit(lambda: init_params(cfg, 0))()
  on = dataclasses.replace(cfg, batch_invariant=True)
  print(
    f"model: {args.layers} layers, d={args.d_model}, vocab {args.vocab}, max_seq_len {cfg.max_seq_len}, fp32; "
    f"engine: prompt {args.prompt}, "
    f"{args.new} new tokens, greedy; learner: {args.seq} tokens a row; {jax.devices()[0].platform}, "
    f"{os.cpu_count()} CPUs\n",
    flush=True,
  )
  print(f"{'what':<8} {'batch':>5} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7}")
  for what, rate in (("engine", engine_rate), ("learner", learner_rate)):
    for B in (int(b) for b in args.batches.split(",")):
      off_r, on_r = rate(cfg, params, B, args), rate(on, params, B, args)
      print(f"{what:<8} {B:>5} {off_r:>10.1f} {on_r:>10.1f} {on_r / off_r:>7.2f}", flush=True)


if __name__ == "__main__":
  main()
