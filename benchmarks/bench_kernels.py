"""Paged attention kernels vs the pure-jnp reference, side by side in one process.

  python benchmarks/bench_kernels.py                 # GPU: batch 4/64/128 x context 2k/4k, bf16
  python benchmarks/bench_kernels.py --batch 64 --context 2048 --pages-per-block 4 8
  python benchmarks/bench_kernels.py --batch 2 --context 16384 --num-splits 1 4 16 0   # GPU split-K
  python benchmarks/bench_kernels.py --pages-per-block 8 16 32            # TPU: KV blocks of 128-512 keys

Decode attention is memory bound: each step reads every live K/V byte once. So the figure of merit is
achieved bandwidth = bytes of K/V read / time, printed next to a measured HBM copy bandwidth (a large
jitted elementwise copy: read + write of N bytes over its time); the target (issue 5) is >= 50% of it at
batch >= 64, context >= 2k. Each row also prints the max |kernel - reference| so a first run on new
hardware checks correctness too.

Knobs: --pages-per-block is the KV block of both kernels (pages per loop iteration on GPU, pages per
double-buffered DMA block on TPU); --num-splits is the GPU decode's flash-decoding kv splits (0: the
kernel's shape heuristic, gpu.decode_num_splits), which matter at small batch and long context.

On CPU there is no Pallas backend to time: the script runs a small shape with the reference next to the
TPU and GPU kernels in interpret mode (GPU decode with 1 and 2 splits), which checks the plumbing;
interpret timings mean nothing.

Shapes: the package legend in jaxllm/__init__.py (R = --batch sequences, K, G, H, P, Z, M); the pools
are head-major [K, P, Z, H], as the engine keeps them.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.kernels import gpu, reference, tpu  # noqa: E402


def timeit(fn, *args, iters: int) -> float:
  """Median seconds per call of an already-jitted fn, after a warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def copy_bandwidth(nbytes: int, iters: int) -> float:
  """Bytes/s of a jitted elementwise pass over nbytes (reads and writes nbytes each)."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  neg = jax.jit(lambda a: -a)  # not x * 1, which XLA folds away
  return 2 * nbytes / timeit(neg, x, iters=iters)


def decode_inputs(batch, context, K, G, H, Z, dtype, seed=0):
  """Every sequence holds `context` keys in randomly permuted pages (page 0 stays the null page):
  q [R, K*G, H], k/v pages [K, P, Z, H], kv_lens [R], page_table [R, M] with R = batch."""
  rng = np.random.default_rng(seed)
  M = -(-context // Z)
  P = 1 + batch * M
  page_table = (1 + rng.permutation(P - 1)).reshape(batch, M).astype(np.int32)
  key = jax.random.key(seed)
  kk, kv, kq = jax.random.split(key, 3)
  k_pages = jax.random.normal(kk, (K, P, Z, H), dtype)
  v_pages = jax.random.normal(kv, (K, P, Z, H), dtype)
  q = jax.random.normal(kq, (batch, K * G, H), dtype)
  kv_lens = jnp.full((batch,), context, jnp.int32)
  return q, k_pages, v_pages, kv_lens, jnp.asarray(page_table)


def ragged_inputs(q_lens, kv_lens, K, G, H, Z, dtype, seed=0):
  """R = len(q_lens) sequences, Q = sum(q_lens) query tokens: the ragged_paged_attention arguments."""
  rng = np.random.default_rng(seed)
  M = -(-max(kv_lens) // Z)
  P = 1 + len(kv_lens) * M
  page_table = (1 + rng.permutation(P - 1)).reshape(len(kv_lens), M).astype(np.int32)
  kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  return (
    jax.random.normal(kq, (int(cu[-1]), K * G, H), dtype),
    jax.random.normal(kk, (K, P, Z, H), dtype),
    jax.random.normal(kv, (K, P, Z, H), dtype),
    jnp.asarray(kv_lens, jnp.int32),
    jnp.asarray(page_table),
    jnp.asarray(cu),
    jnp.int32(len(q_lens)),
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  platform = jax.default_backend()
  on_gpu, on_tpu = platform == "gpu", platform == "tpu"
  real = on_gpu or on_tpu
  ap.add_argument("--batch", type=int, nargs="+", default=[4, 64, 128] if real else [4])
  ap.add_argument("--context", type=int, nargs="+", default=[2048, 4096] if real else [64])
  ap.add_argument("--kv-heads", type=int, default=8 if real else 2)
  ap.add_argument("--group", type=int, default=4, help="query heads per kv head (GQA ratio)")
  ap.add_argument("--head-dim", type=int, default=128 if real else 32)
  ap.add_argument("--page-size", type=int, default=16)
  ap.add_argument(
    "--pages-per-block",
    type=int,
    nargs="+",
    default=[4, 8] if on_gpu else [8, 16, 32] if on_tpu else [2],
    help="pages per KV block (block_k = pages * page size): GPU loop iteration, TPU DMA block",
  )
  ap.add_argument(
    "--num-splits",
    type=int,
    nargs="+",
    default=[0] if real else [1, 2],
    help="GPU decode kv splits (flash-decoding); 0 = the kernel's heuristic",
  )
  ap.add_argument("--block-q", type=int, default=64, help="TPU ragged: query tokens per program")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--iters", type=int, default=20 if real else 3)
  args = ap.parse_args()
  dtype = jnp.dtype(args.dtype)
  K, G, H, Z = args.kv_heads, args.group, args.head_dim, args.page_size

  print(f"device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}")
  if not real:
    print("NOTE: no GPU/TPU; Pallas kernels run in interpret mode: timings below are NOT meaningful.")
  copy_bw = copy_bandwidth(1 << 30 if real else 1 << 26, args.iters)
  print(f"measured copy bandwidth: {copy_bw / 1e9:.1f} GB/s (jitted -x over {'1 GiB' if real else '64 MiB'})")

  def gpu_decode(batch, context):
    """(name, fn) per pages_per_block x num_splits; the name shows the splits the heuristic picked."""
    out = []
    for ppb in args.pages_per_block:
      for splits in args.num_splits:
        M = -(-context // Z)
        used = min(-(-M // ppb), splits or gpu.decode_num_splits(batch, K, M, ppb))
        label = f"S={used}" if splits else f"S=auto({used})"
        out.append(
          (
            f"pallas-gpu ppb={ppb} {label}",
            functools.partial(
              gpu.paged_decode_attention, pages_per_block=ppb, num_splits=splits or None, interpret=not on_gpu
            ),
          )
        )
    return out

  if on_tpu or not real:
    from jax.experimental.pallas import tpu as pltpu

    tpu_kw = {} if on_tpu else {"interpret": pltpu.InterpretParams()}
  tpu_ppbs = args.pages_per_block if on_tpu else args.pages_per_block[:1]

  print(f"\npaged decode attention: K={K} G={G} H={H} page={Z} {dtype.name}")
  hdr = f"{'impl':<30}{'batch':>6}{'context':>8}{'ms':>10}{'GB/s':>9}{'% copy':>8}{'max err':>10}"
  print(hdr + "\n" + "-" * len(hdr))
  for batch in args.batch:
    for context in args.context:
      impls = [("reference", jax.jit(reference.paged_decode_attention))]
      if on_tpu or not real:
        impls += [
          (f"pallas-tpu ppb={ppb}", functools.partial(tpu.paged_decode_attention, pages_per_block=ppb, **tpu_kw))
          for ppb in tpu_ppbs
        ]
      if on_gpu or not real:
        impls += gpu_decode(batch, context)
      inputs = decode_inputs(batch, context, K, G, H, Z, dtype)
      kv_bytes = 2 * batch * context * K * H * dtype.itemsize  # K and V, each read once
      want = None
      for name, fn in impls:
        out = jax.block_until_ready(fn(*inputs))
        want = out if want is None else want
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))
        t = timeit(fn, *inputs, iters=args.iters)
        bw = kv_bytes / t
        print(
          f"{name:<30}{batch:>6}{context:>8}{t * 1e3:>10.3f}{bw / 1e9:>9.1f}{100 * bw / copy_bw:>7.1f}%{err:>10.2e}"
        )

  # Mixed prefill + decode batch: a few prefill chunks and many decode rows in one ragged call.
  if real:
    q_lens, kv_lens = [512] * 4 + [1] * 60, [1024] * 4 + [2048] * 60
  else:
    q_lens, kv_lens = [8, 1, 1], [24, 17, 5]
  ragged = [("reference", jax.jit(reference.ragged_paged_attention))]
  if on_tpu or not real:
    ragged += [
      (
        f"pallas-tpu ppb={ppb} bq={args.block_q}",
        functools.partial(tpu.ragged_paged_attention, pages_per_block=ppb, block_q=args.block_q, **tpu_kw),
      )
      for ppb in tpu_ppbs
    ]
  if on_gpu or not real:
    ragged += [
      (
        f"pallas-gpu ppb={args.pages_per_block[0]}",
        functools.partial(gpu.ragged_paged_attention, pages_per_block=args.pages_per_block[0], interpret=not on_gpu),
      )
    ]
  inputs = ragged_inputs(q_lens, kv_lens, K, G, H, Z, dtype)
  kv_bytes = 2 * sum(kv_lens) * K * H * dtype.itemsize
  print(
    f"\nragged paged attention: {len(q_lens)} seqs, {sum(q_lens)} query tokens, "
    f"{sum(kv_lens)} kv tokens; GB/s counts each sequence's K/V once"
  )
  hdr = f"{'impl':<30}{'ms':>10}{'GB/s':>9}{'max err':>10}"
  print(hdr + "\n" + "-" * len(hdr))
  want = None
  for name, fn in ragged:
    out = jax.block_until_ready(fn(*inputs))
    want = out if want is None else want
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))
    t = timeit(fn, *inputs, iters=args.iters)
    print(f"{name:<30}{t * 1e3:>10.3f}{kv_bytes / t / 1e9:>9.1f}{err:>10.2e}")


if __name__ == "__main__":
  main()
