#!/usr/bin/env python
"""One-shot GPU check, sized for a few minutes on a rented single GPU: hardware ceilings, the Pallas
GPU paged-attention kernels (correctness, then speed against the XLA reference), training MFU, and,
if time is left, serving-engine decode throughput with each attention backend.

  PYTHONPATH=. python benchmarks/gpu_check.py --out $OUT            # on the GPU machine (~3-4 min)
  python benchmarks/gpu_check.py --smoke --out /tmp/gpucheck        # CPU: tiny shapes, kernels interpreted
  python benchmarks/gpu_check.py --out $OUT --sections 2            # one section again

Sections (each in its own try/except, and each timed row in its own, so one failure costs only itself):
 1. ceilings: bf16 matmul 8192^3 (median TFLOP/s of --iters calls after a warm-up) and device copy
    bandwidth (jitted -x over ~4 GB: bytes read + written / time; bench_kernels.copy_bandwidth).
 2. kernels (jaxllm/kernels/gpu.py, compiled for real, interpret=False):
    a. correctness of paged_decode_attention and ragged_paged_attention against
       jaxllm/kernels/reference.py evaluated in fp32 at 'highest' matmul precision, fp32 and bf16,
       with GQA (incl. a group that is not a power of two), ragged lengths, padding rows, and NaN in
       every pool slot no live key occupies (so a kernel that reads one shows it);
    b. decode timing at K=8 G=4 H=128 bf16, page 16 / 64, R sequences x context keys: time per call and
       bandwidth = bytes of K+V read (sum kv_lens * K * H * 2 * 2 B) / time, as % of the copy bandwidth
       of section 1, for the kernel and for the XLA reference;
    c. ragged prefill timing (8 x 1024 fresh prompts, 8 x 1024 chunks on a 4k context, a mixed
       prefill + decode step): time and TFLOP/s of causal attention (4 * N * H per query-key pair).
    Times are device times: the call runs n times inside one jitted fori_loop (each input depends on
    the previous output, so nothing is hoisted), (t(1 + iters) - t(1)) / iters cancels dispatch and sync.
 3. training step MFU of the `small` preset (bf16 compute, fp32 master weights, AdamW, one device, no
    remat) via bench_train.bench_one, then `tiny`; MFU against the measured matmul peak of section 1
    and against the 989 TFLOP/s H100/H200 dense bf16 datasheet figure.
 4. (optional, skipped when short of time) engine decode tokens/s of `small` in bf16 with
    serve.attention=pallas vs reference (jaxllm.serve.bench.engine_decode_tokens_per_s).

 5. (skipped when short of time) deterministic mode in bf16: bits across batching and scheduling,
    learner = sampler, decode cost at batch 8 (benchmarks/gpu_deterministic.py).

Results go to OUT/gpu_check.json and OUT/gpu_check.md after every row, so a crash or the watchdog
(--watchdog s: dump every thread's stack and exit) loses nothing measured before it. --budget s: rows
are no longer started once their share of it is used up (printed as skipped).
Shapes: the package legend in jaxllm/__init__.py (R, Q, N, K, G, H, P, Z, M, L, T, D).
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repo (jaxllm) and benchmarks/ (bench_* helpers)

from gpu_report import Budget, Report, elapsed, guarded, run_section  # noqa: E402  # isort: skip  (clock before jax)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import faulthandler  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from gpu_deterministic import section_deterministic  # noqa: E402

DATASHEET_BF16 = 989e12  # H100/H200 SXM dense bf16 tensor-core FLOP/s (no sparsity)
F32, BF16 = "float32", "bfloat16"
TOL = {F32: 1e-4, BF16: 2e-2}  # max |kernel - fp32 reference| that passes (tests/kernels/test_kernels.py: bf16 2e-2)


# ---------------------------------------------------------------------------------------------------
# Helpers


def device_time(fn, args, iters: int, reps: int = 3):
  """(device seconds per fn(*args), output of one call). fn(q, *rest) -> array shaped like q runs n
  times in one jitted fori_loop; each iteration's q depends on the previous output (a 1e-30 nudge of
  one element), so nothing is hoisted or reused. (t(1 + iters) - t(1)) / iters, medians of `reps`."""

  @jax.jit
  def loop(n, q, *rest):
    def body(_, carry):
      q, _ = carry
      o = fn(q, *rest)
      return q.at[0, 0, 0].add((o[0, 0, 0] * 1e-30).astype(q.dtype)), o

    return jax.lax.fori_loop(0, n, body, (q, jnp.zeros_like(q)))[1]

  out = jax.block_until_ready(loop(1, *args))  # compile + one call

  def t(n):
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(loop(n, *args))
      ts.append(time.perf_counter() - t0)
    return float(np.median(ts))

  small, big = t(1), t(1 + iters)
  per = (big - small) / iters
  return (per if per > 0 else big / (1 + iters)), out


def max_err(out, want) -> float:
  """max |out - want| in fp32; NaN anywhere counts as inf."""
  d = jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))
  return float(jnp.max(jnp.where(jnp.isnan(d), jnp.inf, d)))


def poison(k_pages, v_pages, kv_lens, page_table):
  """Engine-like padding: page-table entries past a sequence's pages -> the null page 0, and NaN in
  every pool slot that holds no live key (page 0 and page tails included): a kernel reading one shows NaN."""
  Z = k_pages.shape[2]
  lens, pt = np.asarray(kv_lens), np.array(page_table)
  need = -(-lens // Z)
  pt[np.arange(pt.shape[1])[None, :] >= need[:, None]] = 0
  live = np.zeros(k_pages.shape[1:3], bool)  # [P, Z]
  for s, n in enumerate(lens):
    for j in range(need[s]):
      live[pt[s, j], : min(Z, int(n) - j * Z)] = True
  m = jnp.asarray(live)[None, :, :, None]
  nan = jnp.array(jnp.nan, k_pages.dtype)
  return jnp.where(m, k_pages, nan), jnp.where(m, v_pages, nan), jnp.asarray(pt)


def causal_flops(q_lens, kv_lens, N: int, H: int) -> float:
  """Attention FLOPs of a ragged step: 4 * N * H per (query, visible key) pair (QK^T and PV); a
  sequence's q rows are its last q_len positions, each sees the keys up to itself."""
  return float(sum(4 * N * H * (q * (kv - q) + q * (q + 1) / 2) for q, kv in zip(q_lens, kv_lens)))


def fp32_reference(fn, *args):
  """The reference on fp32 copies of the float inputs at 'highest' matmul precision (no TF32)."""
  up = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
  with jax.default_matmul_precision("highest"):
    return jax.block_until_ready(fn(*up))


# ---------------------------------------------------------------------------------------------------
# 1. ceilings


def section_ceilings(rep: Report, a) -> dict:
  from bench_kernels import copy_bandwidth, timeit

  n = 512 if a.smoke else 8192
  ka, kb = jax.random.split(jax.random.key(0))
  x, y = jax.random.normal(ka, (n, n), jnp.bfloat16), jax.random.normal(kb, (n, n), jnp.bfloat16)
  t = timeit(jax.jit(jnp.matmul), x, y, iters=a.iters)
  peak = 2 * n**3 / t
  del x, y
  nbytes = (64 << 20) if a.smoke else 4_000_000_000
  bw = copy_bandwidth(nbytes, a.iters)
  cols = [("what", "measurement", ""), ("ms", "ms", ".3f"), ("value", "value", "")]
  rep.row(
    "ceilings",
    cols,
    {
      "what": f"bf16 matmul {n}x{n}x{n} (median of {a.iters})",
      "ms": t * 1e3,
      "value": f"{peak / 1e12:.1f} TFLOP/s ({100 * peak / DATASHEET_BF16:.0f}% of 989)",
    },
  )
  rep.row(
    "ceilings",
    cols,
    {
      "what": f"copy -x over {nbytes / 1e9:.2f} GB (read + write)",
      "ms": 2 * nbytes / bw * 1e3,
      "value": f"{bw / 1e12:.3f} TB/s",
    },
  )
  rep.summary["bf16 matmul peak (measured)"] = f"{peak / 1e12:.1f} TFLOP/s"
  rep.summary["copy bandwidth (measured)"] = f"{bw / 1e12:.3f} TB/s"
  return {"peak": peak, "copy_bw": bw}


# ---------------------------------------------------------------------------------------------------
# 2. kernels

GPU_DECODE_CHECKS = [  # lens: kv_lens per sequence (0 = padding row); splits: num_splits (None = heuristic);
  # ppb: pages_per_block (absent = the kernel's default, 64-key blocks)
  dict(K=2, G=1, H=64, Z=16, lens=[1, 19, 32, 256, 0, 111], dtypes=(F32, BF16), splits=(None, 3)),
  dict(K=8, G=4, H=128, Z=64, lens=[2048, 1, 700, 0, 1500, 64, 65, 1999], dtypes=(BF16,), splits=(None, 1)),
  dict(K=4, G=7, H=128, Z=8, lens=[5, 130, 64, 0], dtypes=(F32,), splits=(None,)),
  dict(K=2, G=4, H=128, Z=16, lens=[300, 17, 0, 512], dtypes=(BF16,), splits=(None, 8), ppb=1),  # bk=16: smallest dot
]
GPU_RAGGED_CHECKS = [  # q, kv: q_lens / kv_lens per sequence; live: num_seqs; pad: padding query rows
  dict(K=2, G=1, H=64, Z=16, q=[1, 37, 0, 100, 5, 0], kv=[50, 37, 3, 130, 40, 0], live=5, pad=3, dtypes=(F32, BF16)),
  dict(K=8, G=4, H=128, Z=64, q=[1, 300, 17, 1, 64], kv=[1000, 300, 517, 2048, 64], live=5, pad=5, dtypes=(BF16,)),
  dict(K=4, G=7, H=128, Z=8, q=[3, 20], kv=[10, 100], live=2, pad=0, dtypes=(F32,)),
]
SMOKE_DECODE_CHECKS = [
  # ppb=1: 4 KV blocks of one page, so 3 splits really split (the last one empty)
  dict(K=2, G=2, H=16, Z=8, lens=[1, 11, 16, 32, 0, 23], dtypes=(F32, BF16), splits=(None, 3), ppb=1),
  dict(K=1, G=3, H=16, Z=4, lens=[5, 12], dtypes=(F32,), splits=(None,)),
]
SMOKE_RAGGED_CHECKS = [
  dict(K=2, G=2, H=16, Z=8, q=[1, 9, 0, 4, 0], kv=[20, 9, 3, 30, 0], live=4, pad=2, dtypes=(F32, BF16)),
]
# Decode timing rows (Z, R, context, pages_per_block, num_splits), most important first (the budget
# may cut the tail). None = the kernel's default (64-key blocks; split heuristic). R=256 stays at 4k keys:
# at 8k one [K, P, Z, H] pool would pass 2^31 elements (int32 offsets, jax.random's counters).
GPU_DECODE_TIMING = [
  (16, 64, 8192, None, None),
  (16, 256, 4096, None, None),
  (64, 64, 8192, None, None),
  (64, 256, 4096, None, None),
  (16, 8, 8192, None, None),
  (16, 1, 8192, None, None),
  (16, 1, 8192, None, 1),
  (16, 64, 1024, None, None),
  (16, 256, 1024, None, None),
  (16, 8, 1024, None, None),
  (16, 1, 1024, None, None),
  (64, 8, 8192, None, None),
  (16, 64, 8192, 8, None),
]
SMOKE_DECODE_TIMING = [(8, 2, 64, None, None), (8, 4, 32, None, 1)]
GPU_RAGGED_TIMING = [
  ("prefill 8x1024", [1024] * 8, [1024] * 8),
  ("chunk 8x1024 @4k", [1024] * 8, [4096] * 8),
  ("mixed 4x512 + 60 dec", [512] * 4 + [1] * 60, [1024] * 4 + [2048] * 60),
]
SMOKE_RAGGED_TIMING = [("prefill 2x16", [16, 16], [16, 16]), ("mixed 1x8 + 2 dec", [8, 1, 1], [24, 17, 5])]


def section_kernels(rep: Report, a, ceil: dict, budget: Budget):
  from bench_kernels import decode_inputs, ragged_inputs

  from jaxllm.kernels import gpu, reference

  interp = a.smoke
  rep.note(
    f"kernels: jaxllm.kernels.gpu (Triton lowering), interpret={interp}; reference: "
    "jaxllm.kernels.reference (XLA). Pools head-major [K, P, Z, H]."
  )
  copy_bw = ceil.get("copy_bw")

  def splits_used(R, K, M, Z, ppb, splits):
    """(pages per block, kv splits) the decode kernel will use: labels only ('?' where it would refuse)."""
    try:
      ppb = gpu._block_pages(Z, ppb, interp)
      return ppb, min(-(-M // ppb), splits or gpu.decode_num_splits(R, K, M, ppb))
    except ValueError:
      return "?", "?"

  # --- a. correctness
  cols = [
    ("kind", "kernel", ""),
    ("shape", "K,G,H,Z", ""),
    ("rows", "R / Q", ""),
    ("dtype", "dtype", ""),
    ("variant", "variant", ""),
    ("err", "max err kernel", ".2e"),
    ("ref_err", "max err XLA ref", ".2e"),
    ("tol", "tol", ".0e"),
    ("ok", "pass", ""),
  ]
  n_ok = n_all = 0

  def check(row: dict, run):
    """One correctness row: run() -> (kernel err, XLA-ref err); an exception is a row too (ERROR)."""
    nonlocal n_ok, n_all
    got = guarded(rep, f"{row['kind']} check {row['shape']} {row['rows']} {row['dtype']} {row['variant']}", run)
    ok = got is not None and got[0] <= TOL[row["dtype"]]
    n_ok, n_all = n_ok + ok, n_all + 1
    rep.row(
      "correctness",
      cols,
      dict(
        row,
        err=got and got[0],
        ref_err=got and got[1],
        tol=TOL[row["dtype"]],
        ok="yes" if ok else ("NO" if got else "ERROR (see notes)"),
      ),
    )

  for c in SMOKE_DECODE_CHECKS if a.smoke else GPU_DECODE_CHECKS:
    for dtype in c["dtypes"]:
      lens = np.array(c["lens"], np.int32)
      base = dict(kind="decode", shape=f"{c['K']},{c['G']},{c['H']},{c['Z']}", rows=f"R={len(lens)}", dtype=dtype)
      case = {}

      def setup(c=c, dtype=dtype, lens=lens, case=case):
        if not case:
          q, k, v, _, pt = decode_inputs(len(lens), int(lens.max()), c["K"], c["G"], c["H"], c["Z"], jnp.dtype(dtype))
          k, v, pt = poison(k, v, lens, pt)
          case["args"] = args = (q, k, v, jnp.asarray(lens), pt)
          case["want"] = want = fp32_reference(reference.paged_decode_attention, *args)
          case["ref_err"] = max_err(reference.paged_decode_attention(*args), want)
        return case["args"], case["want"], case["ref_err"]

      for splits in c["splits"]:
        M = -(-int(lens.max()) // c["Z"])
        ppb, S = splits_used(len(lens), c["K"], M, c["Z"], c.get("ppb"), splits)

        def run(splits=splits, setup=setup, c=c):
          args, want, ref_err = setup()
          out = gpu.paged_decode_attention(*args, interpret=interp, num_splits=splits, pages_per_block=c.get("ppb"))
          return max_err(out, want), ref_err

        check(dict(base, variant=f"ppb={ppb} S={S}" + ("" if splits else " (auto)")), run)
  for c in SMOKE_RAGGED_CHECKS if a.smoke else GPU_RAGGED_CHECKS:
    for dtype in c["dtypes"]:

      def run(c=c, dtype=dtype):
        q, k, v, kvl, pt, cu, _ = ragged_inputs(c["q"], c["kv"], c["K"], c["G"], c["H"], c["Z"], jnp.dtype(dtype))
        k, v, pt = poison(k, v, c["kv"], pt)
        q = jnp.pad(q, ((0, c["pad"]), (0, 0), (0, 0)))  # padding rows past cu[num_seqs]
        args = (q, k, v, kvl, pt, cu, jnp.int32(c["live"]))
        want = fp32_reference(reference.ragged_paged_attention, *args)
        ref_err = max_err(reference.ragged_paged_attention(*args), want)
        return max_err(gpu.ragged_paged_attention(*args, interpret=interp), want), ref_err

      check(
        dict(
          kind="ragged",
          shape=f"{c['K']},{c['G']},{c['H']},{c['Z']}",
          dtype=dtype,
          variant="default",
          rows=f"R={len(c['q'])} live={c['live']} Q={sum(c['q']) + c['pad']}",
        ),
        run,
      )
  rep.summary["kernel correctness (pass / run)"] = f"{n_ok} / {n_all}"
  rep.note(
    "correctness: error against the reference in fp32 at 'highest' precision on the same (upcast) "
    "inputs; 'XLA ref' = the reference itself in the tested dtype (the dtype's own rounding)."
  )

  # --- b. decode timing
  K, G, H = (2, 2, 16) if a.smoke else (8, 4, 128)
  dt = jnp.dtype(BF16)
  cols = [
    ("Z", "Z", "d"),
    ("R", "R", "d"),
    ("ctx", "ctx", "d"),
    ("variant", "kernel variant", ""),
    ("MB", "K+V MB", ".1f"),
    ("p_ms", "pallas ms", ".3f"),
    ("p_gbs", "pallas GB/s", ".0f"),
    ("p_pct", "pallas % copy", ".1f"),
    ("x_ms", "xla ms", ".3f"),
    ("x_gbs", "xla GB/s", ".0f"),
    ("x_pct", "xla % copy", ".1f"),
    ("speedup", "pallas/xla", ".2f"),
    ("err", "max |p - x|", ".1e"),
  ]
  title = f"decode: K={K} G={G} H={H} {dt.name}, time per call (device loop)"
  best_pct = []
  for Z, R, ctx, ppb, splits in SMOKE_DECODE_TIMING if a.smoke else GPU_DECODE_TIMING:
    if not budget.ok(rep, 0.55, f"decode timing Z={Z} R={R} ctx={ctx}"):
      continue

    def time_decode(Z=Z, R=R, ctx=ctx, ppb=ppb, splits=splits):
      args = decode_inputs(R, ctx, K, G, H, Z, dt)
      ppb_used, S = splits_used(R, K, args[4].shape[1], Z, ppb, splits)
      kv_bytes = 2 * R * ctx * K * H * dt.itemsize
      kern = functools.partial(gpu.paged_decode_attention, interpret=interp, pages_per_block=ppb, num_splits=splits)
      row = dict(Z=Z, R=R, ctx=ctx, MB=kv_bytes / 1e6, variant=f"ppb={ppb_used} S={S}" + ("" if splits else " (auto)"))
      tp, out_p = device_time(kern, args, a.iters)
      row.update(p_ms=tp * 1e3, p_gbs=kv_bytes / tp / 1e9, p_pct=100 * kv_bytes / tp / copy_bw if copy_bw else None)
      tx, out_x = device_time(reference.paged_decode_attention, args, a.iters)
      row.update(
        x_ms=tx * 1e3,
        x_gbs=kv_bytes / tx / 1e9,
        x_pct=100 * kv_bytes / tx / copy_bw if copy_bw else None,
        speedup=tx / tp,
        err=max_err(out_p, out_x),
      )
      print(
        f"  decode Z={Z} R={R} ctx={ctx} {row['variant']}: pallas {tp * 1e3:.3f} ms, xla {tx * 1e3:.3f} ms", flush=True
      )
      rep.row(title, cols, row)
      if R >= 64 and ctx >= 4096 and row["p_pct"] is not None:
        best_pct.append(row["p_pct"])

    guarded(rep, f"decode timing Z={Z} R={R} ctx={ctx}", time_decode)
  if best_pct:
    rep.summary["decode pallas, R>=64 ctx>=4k: % of copy bandwidth"] = f"{min(best_pct):.0f}-{max(best_pct):.0f}%"
  rep.note(
    "decode bandwidth = bytes of K and V of every live key (R * ctx * K * H * 2 tensors * 2 B) / time; "
    "'% copy' relative to section 1's copy bandwidth. Only sequences' own pages are read (no NaN here)."
  )

  # --- c. ragged (prefill) timing
  cols = [
    ("case", "case", ""),
    ("Q", "Q", "d"),
    ("R", "R", "d"),
    ("kv", "kv tokens", "d"),
    ("gflop", "GFLOP", ".1f"),
    ("p_ms", "pallas ms", ".3f"),
    ("p_tf", "pallas TFLOP/s", ".1f"),
    ("p_gbs", "pallas KV GB/s", ".0f"),
    ("x_ms", "xla ms", ".3f"),
    ("x_tf", "xla TFLOP/s", ".1f"),
    ("speedup", "pallas/xla", ".2f"),
    ("err", "max |p - x|", ".1e"),
  ]
  Z = 8 if a.smoke else 16
  title = f"ragged paged attention: K={K} G={G} H={H} Z={Z} {dt.name}, causal FLOPs = 4 N H per visible (q, k)"
  for name, q_lens, kv_lens in SMOKE_RAGGED_TIMING if a.smoke else GPU_RAGGED_TIMING:
    if not budget.ok(rep, 0.6, f"ragged timing {name}"):
      continue

    def time_ragged(name=name, q_lens=q_lens, kv_lens=kv_lens):
      args = ragged_inputs(q_lens, kv_lens, K, G, H, Z, dt)
      flops = causal_flops(q_lens, kv_lens, K * G, H)
      kv_bytes = 2 * sum(kv_lens) * K * H * dt.itemsize
      kern = functools.partial(gpu.ragged_paged_attention, interpret=interp)
      tp, out_p = device_time(kern, args, a.iters)
      tx, out_x = device_time(reference.ragged_paged_attention, args, a.iters)
      print(f"  ragged {name}: pallas {tp * 1e3:.3f} ms, xla {tx * 1e3:.3f} ms", flush=True)
      rep.row(
        title,
        cols,
        dict(
          case=name,
          Q=sum(q_lens),
          R=len(q_lens),
          kv=sum(kv_lens),
          gflop=flops / 1e9,
          p_ms=tp * 1e3,
          p_tf=flops / tp / 1e12,
          p_gbs=kv_bytes / tp / 1e9,
          x_ms=tx * 1e3,
          x_tf=flops / tx / 1e12,
          speedup=tx / tp,
          err=max_err(out_p, out_x),
        ),
      )
      if name.startswith("prefill"):
        rep.summary[f"ragged {name}: pallas / xla TFLOP/s"] = f"{flops / tp / 1e12:.1f} / {flops / tx / 1e12:.1f}"

    guarded(rep, f"ragged timing {name}", time_ragged)


# ---------------------------------------------------------------------------------------------------
# 3. training MFU


def section_train(rep: Report, a, ceil: dict, budget: Budget):
  import bench_train

  from jaxllm.config import MODEL_PRESETS

  peak = ceil.get("peak")
  if peak is None:
    from jaxllm.train.metrics import measure_matmul_peak

    n = 512 if a.smoke else 4096
    peak = measure_matmul_peak(BF16, n=n)
    rep.note(f"section 1 gave no peak; measured here: {peak / 1e12:.1f} TFLOP/s (bf16 matmul, best of 5, n={n})")
  runs = [("tiny", 2, 64, 2)] if a.smoke else [("small", 16, 1024, 5), ("tiny", 16, 1024, 5)]
  cols = [
    ("model", "model", ""),
    ("params", "params M", ".1f"),
    ("tokens", "tok/step", "d"),
    ("compile_s", "compile s", ".1f"),
    ("step_ms", "step ms", ".1f"),
    ("tok_s", "tok/s", ",.0f"),
    ("tf_causal", "TFLOP/s (causal)", ".1f"),
    ("mfu", "MFU vs measured", ".1%"),
    ("mfu_ds", "MFU vs 989", ".1%"),
    ("tf_palm", "TFLOP/s (12LTD)", ".1f"),
    ("mfu_palm", "MFU 12LTD vs measured", ".1%"),
    ("loss", "first loss", ".3f"),
  ]
  for i, (model, B, T, steps) in enumerate(runs):
    if not budget.ok(rep, 0.8 if i == 0 else 0.85, f"train {model}"):
      continue

    def one(model=model, B=B, T=T, steps=steps):
      r = bench_train.bench_one(model, "cpu-1", B, T, steps, BF16, "none")
      m = MODEL_PRESETS[model]
      f_causal = m.flops_per_token(T)  # 6 N + 6 L T (N_h H): causal half
      f_palm = f_causal + 6 * m.n_layers * T * m.n_heads * m.resolved_head_dim  # 6 N + 12 L T D (PaLM, no halving)
      tok_s = r["tok_s"]
      row = dict(
        model=model,
        params=r["params_M"],
        tokens=r["tokens"],
        compile_s=r["compile_s"],
        step_ms=r["step_s"] * 1e3,
        tok_s=tok_s,
        tf_causal=tok_s * f_causal / 1e12,
        mfu=tok_s * f_causal / peak,
        mfu_ds=tok_s * f_causal / DATASHEET_BF16,
        tf_palm=tok_s * f_palm / 1e12,
        mfu_palm=tok_s * f_palm / peak,
        loss=r["first_loss"],
      )
      print(f"  train {model}: {tok_s:,.0f} tok/s, MFU {row['mfu']:.1%} of measured peak", flush=True)
      rep.row(f"train step: bf16 compute, fp32 params, AdamW, 1 device, batch x seq = {B} x {T}", cols, row)
      rep.summary[f"train {model} {B}x{T}: tok/s, MFU (measured / 989)"] = (
        f"{tok_s:,.0f}, {row['mfu']:.1%} / {row['mfu_ds']:.1%}"
      )

    guarded(rep, f"train {model}", one)
  rep.note(
    "FLOPs per token: causal = jaxllm ModelConfig.flops_per_token(T) = 6 * N_active (all params but the "
    "input embedding) + 6 * L * T * (n_heads * head_dim) [the 12 L T D attention term halved for causal "
    "masking]; 12LTD = 6 * N_active + 12 * L * T * D (PaLM appendix B, no halving). MFU = FLOPs/token * "
    "tok/s / peak, peak = section 1's measured bf16 matmul (or the 989 TFLOP/s datasheet)."
  )


# ---------------------------------------------------------------------------------------------------
# 4. engine decode


def section_engine(rep: Report, a, budget: Budget):
  from jaxllm.config import MODEL_PRESETS, ServeConfig
  from jaxllm.model.params import init_params
  from jaxllm.serve import Engine
  from jaxllm.serve.bench import engine_decode_tokens_per_s

  model, B, prompt, steps, chunk = ("tiny", 2, 16, 3, 64) if a.smoke else ("small", 64, 1024, 64, 4096)
  cfg = dataclasses.replace(MODEL_PRESETS[model], dtype=BF16, max_seq_len=prompt + steps + 32)
  params = jax.jit(lambda: init_params(cfg, 0))()
  pages = B * -(-cfg.max_seq_len // 16) + 16
  cols = [
    ("attention", "serve.attention", ""),
    ("tok_s", "decode tok/s", ",.0f"),
    ("wall_s", "wall s (incl. compile)", ".1f"),
    ("same", "tokens = first backend's", ".1%"),
  ]
  first = None
  for i, attention in enumerate(("pallas", "reference")):
    if not budget.ok(rep, 0.7 if i == 0 else 0.85, f"engine {attention}"):
      continue

    def one(attention=attention):
      nonlocal first
      t0 = time.perf_counter()
      eng = Engine(
        cfg,
        params,
        ServeConfig(attention=attention, max_running=B, num_pages=pages, page_size=16, chunk_size=chunk, radix=False),
      )
      tok_s, toks = engine_decode_tokens_per_s(eng, B, prompt, steps, reps=1)
      first = toks if first is None else first
      rep.row(
        f"engine decode: {model} bf16, batch {B}, prompt {prompt}, {steps} decode steps",
        cols,
        dict(
          attention=attention,
          tok_s=tok_s,
          wall_s=time.perf_counter() - t0,
          same=float(np.mean(np.asarray(toks) == np.asarray(first))),
        ),
      )
      rep.summary[f"engine decode tok/s ({attention})"] = f"{tok_s:,.0f}"

    guarded(rep, f"engine {attention}", one)


# ---------------------------------------------------------------------------------------------------


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpucheck"), help="directory for gpu_check.json/.md")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on any backend, kernels in interpret mode")
  ap.add_argument("--sections", default="1,2,3,4,5", help="comma list of section numbers to run")
  ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 10; smoke 2)")
  ap.add_argument(
    "--budget", type=float, default=None, help="seconds; rows start only within their share (default 190; smoke 3600)"
  )
  ap.add_argument(
    "--watchdog",
    type=float,
    default=None,
    help="seconds after which every stack is dumped and the process exits (default 235; smoke 3600)",
  )
  a = ap.parse_args()
  a.iters = a.iters or (2 if a.smoke else 10)
  budget = Budget(a.budget or (3600 if a.smoke else 190))
  faulthandler.dump_traceback_later(a.watchdog or (3600 if a.smoke else 235), exit=True)

  dev = jax.devices()[0]
  platform = jax.default_backend()
  if platform != "gpu" and not a.smoke:
    print(f"WARNING: backend is {platform!r}, not gpu: running the --smoke sizes instead", flush=True)
    a.smoke = True
  meta = {
    "jax": jax.__version__,
    "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
    "platform": platform,
    "device_kind": dev.device_kind,
    "devices": len(jax.devices()),
    "python": sys.version.split()[0],
    "smoke": a.smoke,
    "iters": a.iters,
    "budget_s": budget.seconds,
  }
  try:
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
      meta["device_memory_limit_GB"] = round(stats["bytes_limit"] / 1e9, 1)
  except Exception:  # noqa: BLE001 -- not every backend has memory stats
    pass
  rep = Report(a.out, meta)
  print("# gpu_check\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()), flush=True)
  print(f"(jax started after {elapsed():.1f} s)", flush=True)
  want = set(a.sections.split(","))
  ceil = {}
  if "1" in want:
    ceil = run_section(rep, "1. ceilings", section_ceilings, rep, a) or {}
  if "2" in want:
    run_section(rep, "2. Pallas GPU paged attention", section_kernels, rep, a, ceil, budget)
  if "3" in want:
    run_section(rep, "3. training step MFU", section_train, rep, a, ceil, budget)
  if "4" in want:
    run_section(rep, "4. engine decode (optional)", section_engine, rep, a, budget)
  if "5" in want:
    run_section(rep, "5. deterministic mode, bf16", section_deterministic, rep, a, budget)

  for name, s in rep.sections.items():
    failed, skipped = (sum(n.startswith(w) for n in s["notes"]) for w in ("FAILED", "skipped"))
    rep.summary[f"section {name}"] = (
      f"{s['status']}, {s['wall_s']:.1f} s"
      + (f", {failed} row(s) FAILED" if failed else "")
      + (f", {skipped} row(s) skipped" if skipped else "")
    )
  rep.summary["total wall s"] = f"{elapsed():.1f}"
  rep.save()
  print("\n## summary\n\n| metric | value |\n|---|---|", flush=True)
  for k, v in rep.summary.items():
    print(f"| {k} | {v} |")
  print(f"\nwrote {rep.json_path} and {rep.md_path}", flush=True)
  faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
  main()
