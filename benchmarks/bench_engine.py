"""The serving engine against what a user would pick instead, side by side in one process.

Same random Llama weights (fp32, greedy) for all three:
  engine  jaxllm.serve.Engine.generate: continuous batching, chunked prefill, paged KV, radix cache
          (off here: every prompt is new), multi-step decode;
  plain   jaxllm.model.generate: one jitted prefill + a lax.scan of cached one-token steps;
  hf      transformers AutoModelForCausalLM.generate on the same weights (jaxllm.io.export_hf),
          at torch's default thread count and at 1 thread, the faster kept.
Table 1, per batch size: end-to-end tokens/s (new tokens / wall time of the whole call, prefill
included; best of 2 after a warm-up call), the share of greedy tokens equal to the plain loop's, and
decode alone: engine against the plain loop with the prefill taken out.
Table 2: the engine's prefill alone (max_tokens=1) at several chunk sizes against one jitted full
forward of the same [batch, prompt] tokens.
Table 3: the decode phase with serve.overlap off and on: wall time, the time the host waited for the
device, and the host time left on the critical path. Without overlap the host plans, launches, waits
and commits in turn, so host = wall - wait; with overlap its work runs while the device computes,
and what is left is wall - (device time), the device time taken from the run without overlap.
Table 4: warm-up of the serving shapes at chunk 4,096 and 32 running requests: compiles and seconds
(the persistent compilation cache off, so every shape really compiles).

  python benchmarks/bench_engine.py                               # the model of the serving issue
  python benchmarks/bench_engine.py --batches 1,8 --new 32 --layers 2 --d-model 128
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
from jaxllm.model.generate import generate as plain_generate  # noqa: E402
from jaxllm.model.params import init_params, model_def  # noqa: E402
from jaxllm.serve import Engine  # noqa: E402
from jaxllm.serve.bench import (  # noqa: E402
  decode_prompts,
  engine_decode_phase,
  engine_decode_tokens_per_s,
  hf_causal_lm,
  over_torch_threads,
  plain_decode_tokens_per_s,
)
from jaxllm.serve.sampling import SamplingParams  # noqa: E402


def best_of(fn, reps: int = 2):
  """fn() once to warm up, then the best wall time of `reps` calls, and the last result."""
  out = fn()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def hf_generate(model, prompts: np.ndarray, new: int):
  """-> (seconds, tokens [B, new]) of transformers generate, at the faster thread setting."""
  import torch

  ids = torch.from_numpy(prompts.astype(np.int64))

  def run():
    with torch.no_grad():
      out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
      )
    return out[:, prompts.shape[1] :].numpy()

  return min((r for _, r in over_torch_threads(lambda: best_of(run))), key=lambda r: r[0])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
  p.add_argument("--new", type=int, default=64, help="new tokens per sequence")
  p.add_argument("--chunks", default="256,1024,4096", help="prefill chunk sizes of table 2")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--no-hf", action="store_true")
  args = p.parse_args()

  cfg = ModelConfig(
    name="bench",
    n_layers=args.layers,
    d_model=args.d_model,
    n_heads=4,
    n_kv_heads=4,
    d_ff=4 * args.d_model,
    vocab_size=args.vocab,
    max_seq_len=args.prompt + args.new + 16,
  )
  params = jax.jit(lambda: init_params(cfg, 0))()
  mdef = model_def(cfg)
  hf = None if args.no_hf else hf_causal_lm(cfg, params)
  serve = ServeConfig(
    max_running=max(int(b) for b in args.batches.split(",")), num_pages=4096, page_size=16, radix=False
  )
  print(
    f"model: {args.layers} layers, d={args.d_model}, vocab {args.vocab}, fp32, greedy; prompt {args.prompt}, "
    f"{args.new} new tokens; {jax.devices()[0].platform}, {os.cpu_count()} CPUs",
    flush=True,
  )

  rows = []
  for B in [int(b) for b in args.batches.split(",")]:
    prompts = decode_prompts(cfg.vocab_size, B, args.prompt, seed=B)
    x = jnp.asarray(prompts)
    t_plain, plain = best_of(lambda: np.asarray(plain_generate(mdef, params, x, args.new)))
    engine = Engine(cfg, params, serve)
    lists = [list(map(int, r)) for r in prompts]
    sp = SamplingParams(max_tokens=args.new)
    t_eng, outs = best_of(lambda: engine.generate(lists, sp))
    eng = np.array([o.output for o in outs])
    row = {
      "B": B,
      "engine": B * args.new / t_eng,
      "plain": B * args.new / t_plain,
      "eng_same": float(np.mean(eng == plain)),
      "eng_dec": engine_decode_tokens_per_s(engine, B, args.prompt, args.new // 2)[0],
      "plain_dec": plain_decode_tokens_per_s(cfg, params, B, args.prompt, args.new // 2)[0],
    }
    if hf is not None:
      t_hf, hf_toks = hf_generate(hf, prompts, args.new)
      row.update(hf=B * args.new / t_hf, hf_same=float(np.mean(hf_toks == plain)))
    rows.append(row)
    print(f"  batch {B}: done", flush=True)

  print("\nend to end (prefill included), tokens/s; 'same' = greedy tokens equal to the plain loop's")
  print("decode only: tokens/s of the decode phase (engine: from every request's first token; plain:")
  print("time(1 + n new) - time(1 new), so prefill cancels); n = --new / 2")
  head = (
    f"{'batch':>5} {'engine':>8} {'plain':>8} {'hf':>8} {'eng/plain':>9} {'eng/hf':>7} {'eng same':>8} "
    f"{'hf same':>7} | {'dec eng':>8} {'dec plain':>9} {'ratio':>6}"
  )
  print(head + "\n" + "-" * len(head))
  for r in rows:
    hf_s = f"{r['hf']:>8.0f}" if "hf" in r else f"{'-':>8}"
    ratio = f"{r['engine'] / r['hf']:>7.2f}" if "hf" in r else f"{'-':>7}"
    same = f"{100 * r['hf_same']:>6.1f}%" if "hf" in r else f"{'-':>7}"
    print(
      f"{r['B']:>5} {r['engine']:>8.0f} {r['plain']:>8.0f} {hf_s} {r['engine'] / r['plain']:>9.2f} {ratio} "
      f"{100 * r['eng_same']:>7.1f}% {same} | {r['eng_dec']:>8.0f} {r['plain_dec']:>9.0f} "
      f"{r['eng_dec'] / r['plain_dec']:>6.2f}"
    )

  B = max(int(b) for b in args.batches.split(","))
  prompts = decode_prompts(cfg.vocab_size, B, args.prompt, seed=B)
  fwd = jax.jit(lambda p, x: mdef.bind(p)(x).logits)
  t_full, _ = best_of(lambda: fwd(params, jnp.asarray(prompts)).block_until_ready())
  print(
    f"\nprefill of {B} x {args.prompt} = {B * args.prompt} tokens: full forward {t_full:.3f} s "
    f"({B * args.prompt / t_full:.0f} tok/s)"
  )
  head = f"{'chunk':>6} {'seconds':>8} {'tok/s':>8} {'vs full forward':>15} {'first call (compiles)':>22}"
  print(head + "\n" + "-" * len(head))
  lists = [list(map(int, r)) for r in prompts]
  for chunk in [int(c) for c in args.chunks.split(",")]:
    engine = Engine(
      cfg, params, ServeConfig(chunk_size=chunk, max_running=B, num_pages=4096, page_size=16, radix=False)
    )
    t0 = time.perf_counter()
    engine.generate(lists, SamplingParams(max_tokens=1))
    first = time.perf_counter() - t0
    t, _ = best_of(lambda: engine.generate(lists, SamplingParams(max_tokens=1)), reps=2)
    print(f"{chunk:>6} {t:>8.3f} {B * args.prompt / t:>8.0f} {t_full / t:>14.2f}x {first:>21.1f}s")

  print("\ndecode phase of a batch of", B, "(from every request's first token to the end)")
  head = f"{'overlap':>7} {'wall s':>7} {'waited s':>8} {'host on critical path':>22} {'tok/s':>7} {'chained':>7}"
  print(head + "\n" + "-" * len(head))
  device_s = None
  for overlap in (False, True):
    engine = Engine(cfg, params, dataclasses.replace(serve, overlap=overlap))
    m = engine_decode_phase(engine, lists, args.new)
    wall = m["wall"]
    device_s = m["waited"] if device_s is None else device_s  # the run without overlap waits for all of it
    host = max(0.0, wall - device_s)
    print(
      f"{str(overlap):>7} {wall:>7.3f} {m['waited']:>8.3f} {host:>11.3f} s ({100 * host / wall:>4.1f}%) "
      f"{m['tok_s']:>7.0f} {m['chained']:>7}"
    )

  print("\nwarm-up at chunk 4096, 32 running (persistent compilation cache off)")
  jax.config.update("jax_enable_compilation_cache", False)
  fresh = dataclasses.replace(cfg, name="warmup")  # step functions not compiled by the runs above
  engine = Engine(
    fresh, params, ServeConfig(chunk_size=4096, max_running=32, num_pages=4096, page_size=16, radix=False)
  )
  t0 = time.perf_counter()
  n = engine.warmup()
  print(
    f"{n} compiles in {time.perf_counter() - t0:.1f} s (decode and multi-step per sequences bucket, "
    f"ragged per tokens bucket)"
  )


if __name__ == "__main__":
  main()
