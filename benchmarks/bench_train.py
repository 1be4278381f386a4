#!/usr/bin/env python
"""Training throughput and MFU, side by side in one process: models x meshes, against the measured
matmul peak of this machine (not a datasheet number).

  python benchmarks/bench_train.py                       # tiny and small on cpu-1 and cpu-8
  python benchmarks/bench_train.py --models small --meshes cpu-1 --dtype bfloat16   # e.g. on a GPU
  python benchmarks/bench_train.py --peer torch --meshes cpu-1 --steps 10   # vs transformers LlamaForCausalLM

--peer torch builds the same model as transformers' LlamaForCausalLM (config from jaxllm.io.hf_config),
trains it with torch.optim.AdamW (same lr, betas, eps, weight decay on the same parameters, the same
grad-norm clipping) in fp32 on the same batch, with torch.set_num_threads(cores), and times its steps
(forward, loss, backward, clip, optimizer step) round robin with jaxllm's, one warm-up step each
excluded; the table gives both medians and the ratio jaxllm/torch. Use one device (--meshes cpu-1):
cpu-8 splits the same cores into 8 emulated devices.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxllm import cli  # noqa: E402  (no jax: the setup below must come before jax starts)

MESHES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "meshes")
if __name__ == "__main__":
  cli.tune_malloc()  # one process: jaxllm and the torch peer both run under it


def _devices_needed(argv) -> int:
  """Emulated CPU devices of the largest mesh asked for ('all': 8). Only that many: 8 emulated devices
  where one is used slow both jaxllm and the torch peer (docs/benchmarks.md)."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--meshes", default="cpu-1,cpu-8")
  names = pre.parse_known_args(argv)[0].meshes.split(",")
  return max(cli.mesh_device_count(os.path.join(MESHES, f"{m}.toml")) or 8 for m in names)


os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_devices_needed(sys.argv[1:])}")
# --peer torch: torch's OpenMP threads otherwise spin between ops and take the cores from XLA's
# threads in the same process (and XLA's from torch), slowing both sides (docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.config import load_config  # noqa: E402
from jaxllm.model.params import model_def  # noqa: E402
from jaxllm.parallel import build_mesh, mesh_hooks  # noqa: E402
from jaxllm.parallel.sharding import batch_sharding  # noqa: E402
from jaxllm.train.metrics import measure_matmul_peak, time_train_steps  # noqa: E402
from jaxllm.train.optim import make_optimizer  # noqa: E402
from jaxllm.train.state import init_state, state_shardings  # noqa: E402
from jaxllm.train.step import make_train_step  # noqa: E402


def bench_one(model: str, mesh_name: str, batch: int, seq: int, steps: int, dtype: str, remat: str) -> dict:
  r = build_one(model, mesh_name, batch, seq, dtype, remat)
  dt, r["state"], m = time_train_steps(r["step"], r["state"], r["data"], steps)
  return finish_row(r, dt, float(m["loss"]))


def build_one(model: str, mesh_name: str, batch: int, seq: int, dtype: str, remat: str, extra=()) -> dict:
  """jaxllm's compiled train step, state and batch for one model x mesh (nothing timed yet); `extra`:
  more section.key=value overrides (benchmarks/bench_remat.py)."""
  overrides = [
    f"model={model}",
    f"model.dtype={dtype}",
    f"model.remat={remat}",
    f"train.batch_size={batch}",
    f"train.seq_len={seq}",
    *extra,
  ]
  mesh_file = os.path.join(MESHES, f"{mesh_name}.toml")
  if os.path.exists(mesh_file):
    overrides.append(f"mesh={mesh_file}")
  else:  # "all": every local device as data parallel
    overrides.append(f"mesh.dp={len(jax.devices())}")
  cfg = load_config([], overrides)
  mesh, plan = build_mesh(cfg.mesh, jax.devices()[: cfg.mesh.num_devices])
  mdef = model_def(cfg.model)
  tx = make_optimizer(cfg.train, mdef.logical)
  sh = state_shardings(mdef, tx, mesh, plan)
  state = init_state(mdef, tx, sh, 0)
  b_sh = batch_sharding(mesh, plan)
  step = make_train_step(mdef, tx, sh, b_sh, hook_kwargs=mesh_hooks(mesh, plan, cfg.model))
  rng = np.random.default_rng(0)
  data = jax.device_put(
    {k: jnp.asarray(rng.integers(0, 256, (batch, seq)), jnp.int32) for k in ("inputs", "targets")}, b_sh
  )
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return {
    "model": model,
    "mesh": mesh_name,
    "cfg": cfg,
    "step": step,
    "state": state,
    "data": data,
    "params_M": cfg.model.param_counts()["total"] / 1e6,
    "tokens": batch * seq,
    "compile_s": compile_s,
    "temp_MB": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
    "host_temp_MB": getattr(mem, "host_temp_size_in_bytes", 0) / 2**20,
  }


def finish_row(r: dict, dt: float, first_loss: float) -> dict:
  tok_s = r["tokens"] / dt
  row = {k: v for k, v in r.items() if k not in ("cfg", "step", "state", "data")}
  return {
    **row,
    "step_s": dt,
    "tok_s": tok_s,
    "first_loss": first_loss,
    "tflops": tok_s * r["cfg"].model.flops_per_token(r["cfg"].train.seq_len) / 1e12,
  }


def torch_peer(cfg, batch: int, seq: int, threads: int, seed: int = 0):
  """transformers LlamaForCausalLM of the same shape as cfg.model, with torch AdamW set up like
  jaxllm's optimizer (decay on the same parameters, same clipping). -> (step() -> loss, n_params)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  from jaxllm.io.hf_config import model_config_to_hf

  if cfg.model.dtype != "float32" or cfg.model.is_moe or cfg.model.qkv_bias or cfg.model.qk_norm:
    raise SystemExit("--peer torch compares fp32 dense Llama-shaped models only")
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  hf = model_config_to_hf(cfg.model, "LlamaForCausalLM")
  hf.pop("architectures"), hf.pop("model_type"), hf.pop("torch_dtype")
  hf["use_cache"] = False
  model = LlamaForCausalLM(LlamaConfig(**hf))  # attention: transformers' default (sdpa)
  model.train()
  t = cfg.train
  # jaxllm decays matrices that touch the residual stream (all >= 2-D here), never norm scales.
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
    lr=t.lr,
    betas=(t.b1, t.b2),
    eps=1e-8,
  )
  g = torch.Generator().manual_seed(seed)
  inputs = torch.randint(0, 256, (batch, seq), generator=g)
  targets = torch.randint(0, 256, (batch, seq), generator=g)
  V = cfg.model.vocab_size

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, V), targets.view(-1))
    loss.backward()
    if t.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    return loss.item()

  return step, sum(p.numel() for p in model.parameters())


def bench_vs_torch(model: str, mesh_name: str, batch: int, seq: int, steps: int, remat: str, threads: int):
  """jaxllm and the torch peer timed round robin (one warm-up step each, excluded) -> (row, torch row)."""
  r = build_one(model, mesh_name, batch, seq, "float32", remat)
  tstep, n_torch = torch_peer(r["cfg"], batch, seq, threads)
  n_ours = r["cfg"].model.param_counts()["total"]
  if n_torch != n_ours:
    raise SystemExit(f"torch peer has {n_torch} parameters, jaxllm {n_ours}: the models differ")
  state, m = r["step"](r["state"], r["data"])
  jax.block_until_ready(m)
  first_loss = float(m["loss"])
  t0 = time.perf_counter()
  torch_first = tstep()
  torch_compile = time.perf_counter() - t0
  ours, theirs = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = r["step"](state, r["data"])
    jax.block_until_ready(m)
    ours.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    tstep()
    theirs.append(time.perf_counter() - t0)
  r["state"] = state
  med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
  row = finish_row(r, med(ours), first_loss)
  trow = {
    **row,
    "mesh": f"torch{threads}",
    "compile_s": torch_compile,
    "step_s": med(theirs),
    "tok_s": r["tokens"] / med(theirs),
    "first_loss": torch_first,
    "temp_MB": float("nan"),
  }
  trow["tflops"] = row["tflops"] * row["step_s"] / trow["step_s"]
  return row, trow


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="tiny,small")
  p.add_argument("--meshes", default="cpu-1,cpu-8", help="meshes/NAME.toml presets, or 'all' (every device as dp)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument(
    "--peer",
    choices=["none", "torch"],
    default="none",
    help="also train the same model in PyTorch + transformers, timed round robin with ours",
  )
  p.add_argument(
    "--threads",
    type=int,
    default=len(os.sched_getaffinity(0)),
    help="torch.set_num_threads for --peer torch (default: the cores this process may use)",
  )
  a = p.parse_args()
  if a.peer == "torch":
    return main_vs_torch(a)
  peak = measure_matmul_peak(a.dtype)
  platform = jax.devices()[0].platform
  n_chips = 1 if platform == "cpu" else None
  print(
    f"platform {platform} ({jax.devices()[0].device_kind}), measured {a.dtype} matmul peak "
    f"{peak / 1e12:.3f} TFLOP/s per {'machine (all cores)' if platform == 'cpu' else 'device'}"
  )
  rows = []
  for model in a.models.split(","):
    for mesh in a.meshes.split(","):
      r = bench_one(model, mesh, a.batch, a.seq, a.steps, a.dtype, a.remat)
      chips = n_chips or (8 if mesh == "cpu-8" else 1)
      r["mfu"] = r["tflops"] * 1e12 / (peak * (chips if platform != "cpu" else 1))
      rows.append(r)
      print(f"  done {model} on {mesh}", flush=True)
  head = (
    f"{'model':<8}{'mesh':<8}{'params':>8}{'tok/step':>10}{'compile s':>11}{'step s':>9}{'tok/s':>10}"
    f"{'TFLOP/s':>9}{'MFU':>7}{'temp MB':>9}"
  )
  print(head + "\n" + "-" * len(head))
  for r in rows:
    print(
      f"{r['model']:<8}{r['mesh']:<8}{r['params_M']:>7.1f}M{r['tokens']:>10}{r['compile_s']:>11.1f}"
      f"{r['step_s']:>9.3f}{r['tok_s']:>10,.0f}{r['tflops']:>9.3f}{100 * r['mfu']:>6.1f}%{r['temp_MB']:>9.0f}"
    )
  print(
    "MFU = model FLOPs (6N + causal attention, per token) x tokens/s / measured matmul peak; "
    "on CPU the 8 emulated devices share the same cores, so the peak is the whole machine's."
  )


def main_vs_torch(a):
  if a.dtype != "float32":
    raise SystemExit("--peer torch runs fp32 (the CPU comparison); drop --dtype")
  print(
    f"platform {jax.devices()[0].platform}, {len(jax.devices())} jax devices, torch threads {a.threads}, "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {a.steps} timed steps each, round robin, medians",
    flush=True,
  )
  rows = []
  for model in a.models.split(","):
    for mesh in a.meshes.split(","):
      rows.append(bench_vs_torch(model, mesh, a.batch, a.seq, a.steps, a.remat, a.threads))
      print(f"  done {model} on {mesh}", flush=True)
  head = (
    f"{'model':<8}{'params':>8}{'tok/step':>10}{'jaxllm mesh':>12}{'step s':>9}{'tok/s':>10}"
    f"{'torch':>9}{'step s':>9}{'tok/s':>10}{'jaxllm/torch':>14}{'loss0 jax/torch':>18}"
  )
  print(head + "\n" + "-" * len(head))
  for r, t in rows:
    print(
      f"{r['model']:<8}{r['params_M']:>7.1f}M{r['tokens']:>10}{r['mesh']:>12}{r['step_s']:>9.3f}"
      f"{r['tok_s']:>10,.0f}{t['mesh']:>9}{t['step_s']:>9.3f}{t['tok_s']:>10,.0f}"
      f"{r['tok_s'] / t['tok_s']:>13.2f}x{r['first_loss']:>9.3f}/{t['first_loss']:.3f}"
    )
  print(
    "Both fp32, AdamW, grad-norm clipping as configured; torch = transformers LlamaForCausalLM "
    "(sdpa attention), eager. The first (warm-up) step of each is excluded."
  )


if __name__ == "__main__":
  main()
