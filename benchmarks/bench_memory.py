#!/usr/bin/env python
"""Compiled temp memory of one training step against sequence length, per attention implementation
(model.attention): XLA's own memory_analysis() of value_and_grad of the LM loss on one device,
compiled and never run, so long sequences cost compile time only.

  python benchmarks/bench_memory.py                                   # xla and flash, T = 512 .. 32768
  python benchmarks/bench_memory.py --attention flash --seq 4096,16384 --d-model 512 --layers 8

A compile that fails or exceeds --timeout seconds is reported as such (at 32k tokens the naive
path's [B, K, G, T, T] fp32 scores alone are tens of GiB).
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm.config import ModelConfig  # noqa: E402
from jaxllm.model.params import model_def  # noqa: E402
from jaxllm.train.step import loss_sums  # noqa: E402


def temp_bytes(cfg: ModelConfig, batch: int, seq: int) -> int:
  """Temp bytes of the compiled value_and_grad of the mean token loss (params and batch abstract)."""
  mdef = model_def(cfg)
  params = mdef.abstract_params()
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def loss(p, b):
    nll, count, aux = loss_sums(mdef, p, b)
    return nll / count + aux

  step = jax.jit(jax.value_and_grad(loss))
  return step.lower(params, {"inputs": tokens, "targets": tokens}).compile().memory_analysis().temp_size_in_bytes


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--attention", default="xla,flash", help="comma-separated model.attention values")
  ap.add_argument("--seq", default="512,2048,8192,32768", help="comma-separated sequence lengths T")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv-heads", type=int, default=2)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument(
    "--timeout", type=float, default=600, help="skip longer T of an attention once a compile took this long"
  )
  args = ap.parse_args()
  base = ModelConfig(
    name="bench",
    vocab_size=args.vocab,
    d_model=args.d_model,
    n_layers=args.layers,
    n_heads=args.heads,
    n_kv_heads=args.kv_heads,
    d_ff=4 * args.d_model,
    dtype=args.dtype,
  )
  seqs = [int(s) for s in args.seq.split(",")]
  print(
    f"# {jax.devices()[0].platform}: d_model={args.d_model} layers={args.layers} heads={args.heads}/{args.kv_heads} "
    f"vocab={args.vocab} batch={args.batch} {args.dtype}; temp bytes of value_and_grad(loss), compiled only"
  )
  print(f"{'attention':>10} {'T':>7} {'temp MiB':>12} {'x prev':>7} {'compile s':>10}")
  for impl in args.attention.split(","):
    cfg = dataclasses.replace(base, attention=impl, max_seq_len=max(seqs))
    prev, slow = None, False
    for T in seqs:
      if slow:
        print(f"{impl:>10} {T:>7} {'skipped (previous compile > --timeout)':>30}")
        continue
      t0 = time.perf_counter()
      try:
        b = temp_bytes(cfg, args.batch, T)
      except Exception as e:  # noqa: BLE001 (report and go on: an OOM or compile failure is a result)
        print(f"{impl:>10} {T:>7} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        continue
      dt = time.perf_counter() - t0
      ratio = f"{b / prev:.1f}" if prev else ""
      print(f"{impl:>10} {T:>7} {b / 2**20:>12.1f} {ratio:>7} {dt:>10.1f}", flush=True)
      prev, slow = b, dt > args.timeout


if __name__ == "__main__":
  main()
