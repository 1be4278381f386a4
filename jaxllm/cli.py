"""Shared command-line plumbing for train.py and serve.py: device-count setup before jax starts,
help text generated from the config dataclasses' field comments, and plain-words error exits."""

from __future__ import annotations

import inspect
import os
import re
import sys
import tomllib

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CPU_MESH = os.path.join(HERE, "meshes", "cpu-8.toml")


def prepare_devices(mesh_path: str | None, overrides=()) -> None:
  """Before jax is imported: make the CPU platform expose as many devices as the mesh needs, its
  preset with the command line's mesh.pp/dp/tp=N overrides (the flag only affects the CPU backend,
  so it is harmless on GPU/TPU)."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  path = mesh_path or DEFAULT_CPU_MESH
  try:
    with open(path, "rb") as f:
      m = tomllib.load(f).get("mesh", {})
  except (OSError, tomllib.TOMLDecodeError):
    return  # load_config reports the problem properly later
  for o in overrides:
    key, _, value = o.partition("=")
    if key.strip() in ("mesh.pp", "mesh.dp", "mesh.tp") and value.strip().isdigit():
      m[key.strip()[5:]] = int(value)
  n = int(m.get("pp", 1)) * int(m.get("dp", 1)) * int(m.get("tp", 1))
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()


# glibc malloc settings for a training or serving process (see tune_malloc): mmap_max=0 and
# arena_max=1 serve large blocks from the one heap, trim_threshold keeps it from shrinking,
# hugetlb=1 maps it in 2 MiB pages.
MALLOC_TUNABLES = (
  "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=1000000000000:glibc.malloc.hugetlb=1"
)


def malloc_tunable() -> bool:
  """Linux with glibc >= 2.35 (which has every tunable of MALLOC_TUNABLES) and transparent huge pages
  not [never]."""
  import platform

  lib, version = platform.libc_ver()
  try:
    if lib != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
      return False
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" not in f.read()
  except (OSError, ValueError):
    return False


def tune_malloc(before_exec=None) -> None:
  """First thing in a CLI's `__main__`, before jax starts: re-exec this command with MALLOC_TUNABLES
  (glibc reads tunables only at process start). XLA:CPU allocates each step's temp buffer afresh, and
  glibc would mmap and unmap it every step, faulting every page in again; these settings keep freed
  memory in the one heap, backed by huge pages (docs/architecture.md, "CPU speed"). Nothing changes
  numerically; the process keeps its peak memory, as a caching GPU allocator does.
  A no-op without glibc >= 2.35, with THP [never], a glibc.malloc tunable already set,
  JAXLLM_TUNE_MALLOC=0, jax already imported, or `python -c` / stdin. `before_exec` runs just
  before the exec (pytest stops its output capture there)."""
  if os.environ.get("JAXLLM_TUNE_MALLOC", "1") == "0" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
    return
  if "jax" in sys.modules or len(sys.orig_argv) < 2 or sys.orig_argv[1] in ("-", "-c") or not malloc_tunable():
    return
  tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES", ""), MALLOC_TUNABLES) if t)
  if before_exec is not None:
    before_exec()
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})


def mesh_device_count(mesh_path: str | None, overrides=()) -> int | None:
  """pp*dp*tp of the run's mesh from its preset TOML (default cpu-8) and any mesh.pp/dp/tp=N
  overrides, read without starting jax; None if the file cannot be read."""
  try:
    with open(mesh_path or DEFAULT_CPU_MESH, "rb") as f:
      m = tomllib.load(f).get("mesh", {})
  except (OSError, tomllib.TOMLDecodeError):
    return None
  for o in overrides:
    key, _, value = o.partition("=")
    if key in ("mesh.pp", "mesh.dp", "mesh.tp") and value.strip().isdigit():
      m[key[5:]] = int(value)
  return int(m.get("pp", 1)) * int(m.get("dp", 1)) * int(m.get("tp", 1))


def add_distributed_args(p) -> None:
  """The multi-host options of an argparse parser (see jaxllm.parallel.distributed)."""
  g = p.add_argument_group(
    "multi-host (one process per host; default: $JAXLLM_COORDINATOR, "
    "$JAXLLM_NUM_PROCESSES, $JAXLLM_PROCESS_ID, else a detected TPU pod / SLURM / Open MPI "
    "job, else one process)"
  )
  g.add_argument("--coordinator", help="HOST:PORT of process 0, which every process connects to")
  g.add_argument("--num-processes", type=int, help="processes in the run")
  g.add_argument("--process-id", type=int, help="this process's index in [0, num-processes)")
  g.add_argument(
    "--local-devices", type=int, help="devices per process on CPU (default: the mesh's device count / num-processes)"
  )


def init_distributed(args, overrides=()) -> None:
  """Join a multi-process run if the flags, environment or cluster ask for one (before jax starts)."""
  from jaxllm.parallel.distributed import DistributedError, initialize

  try:
    initialize(
      args.coordinator, args.num_processes, args.process_id, args.local_devices, mesh_device_count(args.mesh, overrides)
    )
  except DistributedError as e:
    fail(str(e))


def enable_compile_cache() -> str | None:
  """Turn on JAX's persistent compilation cache (serving compiles one program per shape bucket, and a
  restarted server should not pay for them again): $JAXLLM_COMPILE_CACHE, default
  ~/.cache/jaxllm/xla; JAXLLM_COMPILE_CACHE="" turns it off. A cache dir the user configured for jax
  itself (JAX_COMPILATION_CACHE_DIR) wins. -> the directory in use, or None."""
  import jax

  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  path = os.environ.get("JAXLLM_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxllm", "xla"))
  if not path:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None  # read-only home: run without it
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def mesh_overrides(mesh_path: str | None) -> list[str]:
  """The mesh part of a run's overrides: the given preset file; without one, the emulated cpu-8
  preset on a CPU-only machine, else all local devices as dp."""
  if mesh_path:
    return [f"mesh={mesh_path}"]
  import jax

  if jax.devices()[0].platform == "cpu":
    return [f"mesh={DEFAULT_CPU_MESH}"]
  return [f"mesh.dp={len(jax.devices())}", f"mesh.device={jax.devices()[0].platform}", "mesh.name=all-dp"]


def config_help(sections=("model", "mesh", "train")) -> str:
  """Every config key of these sections with its type, default and the comment beside its field."""
  from jaxllm import config as C

  classes = C.SECTIONS
  out = []
  for section, cls in ((s, classes[s]) for s in sections):
    out.append(f"[{section}]  ({cls.__doc__.strip().splitlines()[0]})")
    for line in inspect.getsource(cls).splitlines():
      m = re.match(r"\s+(\w+): ([\w\[\], .|]+?) = (.+?)\s+# (.*)$", line)
      if m:
        name, typ, default, comment = m.groups()
        out.append(f"  {section}.{name}={default}  ({typ}) {comment}")
  if "model" in sections:
    out.append("model presets: " + ", ".join(sorted(C.MODEL_PRESETS)) + "   (select with model=NAME)")
  return "\n".join(out)


def user_errors() -> tuple[type[Exception], ...]:
  """The errors a CLI reports in one plain line (bad config, checkpoint, data, or a diverged run):
  `except cli.user_errors() as e: cli.fail(str(e))` (evaluated only when something is raised, after
  jax has started)."""
  from jaxllm.config import ConfigError
  from jaxllm.io.checkpoint import CheckpointError
  from jaxllm.train.runner import TrainingDiverged

  return ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError, ValueError


def is_main() -> bool:
  """Process 0 of a multi-host run (the one that prints summaries), or the only process."""
  from jaxllm.parallel.distributed import is_main_process

  return is_main_process()


def fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)
