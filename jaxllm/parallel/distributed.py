"""Multi-host (multi-controller) runs on JAX's own runtime: `jax.distributed.initialize`, and token
batches assembled from each process's share of the rows.

One process per host (or per group of local devices) runs the same program; after
`initialize` every process sees the global device list, the mesh spans all of them, and jitted
steps are SPMD over it (collectives between hosts by the backend: ICI/DCN on TPU, NCCL on GPU,
gloo on CPU). Nothing here is home-made: the coordinator, the cluster detection (Cloud TPU pods,
SLURM, Open MPI) and the cross-host transfers are JAX's.

Where the values come from, first match wins:
  1. explicit arguments (train.py --coordinator HOST:PORT --num-processes N --process-id I),
  2. the environment JAXLLM_COORDINATOR / JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID
     (and JAXLLM_LOCAL_DEVICES),
  3. a cluster JAX detects itself with more than one process -> `jax.distributed.initialize()`.
Otherwise nothing is initialised and the run is single-process, exactly as without this module.

Call `initialize` before anything touches a jax backend (jax.devices(), an array, a jit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import numpy as np

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, ENV_LOCAL_DEVICES = (
  "JAXLLM_COORDINATOR",
  "JAXLLM_NUM_PROCESSES",
  "JAXLLM_PROCESS_ID",
  "JAXLLM_LOCAL_DEVICES",
)


class DistributedError(ValueError):
  """Inconsistent multi-process settings; the message says which values disagree."""


@dataclass(frozen=True)
class Cluster:
  """How this process takes part in the run (`source`: "flags", "env" or the detected cluster)."""

  num_processes: int
  process_id: int
  coordinator: str | None
  local_devices: int | None
  source: str


def _int(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def detected_cluster() -> str | None:
  """The name of a multi-process cluster environment JAX's auto-detection would use (Cloud TPU pod
  slice, SLURM job with several tasks, Open MPI launch, ...), or None (also for a one-process one)."""
  try:
    from jax._src.clusters import ClusterEnv  # the list jax.distributed.initialize() itself walks

    for env in ClusterEnv._cluster_types:
      if not env.opt_in_only_method and env.is_env_present() and int(env.get_process_count()) > 1:
        return env.__name__
    return None
  except ImportError:  # a jax without the private module: the common launchers by their variables
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
      return "SlurmCluster"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
      return "OmpiCluster"
    return None
  except Exception:  # a detector that could not answer (e.g. no metadata server): not a cluster
    return None


def resolve(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_devices: int | None = None,
  mesh_devices: int | None = None,
  environ=None,
) -> Cluster | None:
  """The multi-process settings from arguments, then JAXLLM_* variables, then a detected cluster;
  None for a single-process run. `mesh_devices` (pp*dp*tp of the run's mesh) checks the counts and
  gives the local device count on CPU (mesh_devices / num_processes) when `local_devices` is unset."""
  env = os.environ if environ is None else environ
  source = "flags" if coordinator or num_processes is not None or process_id is not None else "env"
  coordinator = coordinator or env.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  local_devices = local_devices if local_devices is not None else _int(env.get(ENV_LOCAL_DEVICES), ENV_LOCAL_DEVICES)
  if coordinator is None and num_processes is None and process_id is None:
    name = detected_cluster()
    if name is None:
      if local_devices is not None and mesh_devices is not None and local_devices != mesh_devices:
        raise DistributedError(
          f"--local-devices {local_devices} on a single process, but the mesh needs "
          f"{mesh_devices} devices; run "
          f"{mesh_devices // local_devices if mesh_devices % local_devices == 0 else 'more'} "
          "processes (--coordinator/--num-processes/--process-id) or drop --local-devices"
        )
      return None
    return Cluster(0, 0, None, local_devices, name)  # counts filled in by jax after initialize
  if num_processes == 1 and not coordinator:
    return None
  missing = [
    n
    for n, v in (
      ("--coordinator HOST:PORT", coordinator),
      ("--num-processes", num_processes),
      ("--process-id", process_id),
    )
    if v is None
  ]
  if missing:
    raise DistributedError(
      f"a multi-process run needs all of --coordinator, --num-processes and --process-id "
      f"(or {ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); missing " + ", ".join(missing)
    )
  if ":" not in coordinator:
    raise DistributedError(f"coordinator {coordinator!r} must be HOST:PORT (process 0's host, a free port)")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise DistributedError(f"process id {process_id} is not in [0, {num_processes}) for {num_processes} processes")
  if local_devices is not None and local_devices < 1:
    raise DistributedError(f"local devices must be >= 1, got {local_devices}")
  if mesh_devices is not None:
    if local_devices is None:
      if mesh_devices % num_processes:
        raise DistributedError(
          f"the mesh needs {mesh_devices} devices, which {num_processes} processes cannot "
          f"split evenly; use a process count that divides {mesh_devices}"
        )
    elif local_devices * num_processes != mesh_devices:
      raise DistributedError(
        f"the mesh needs {mesh_devices} devices but {num_processes} processes x "
        f"{local_devices} local devices = {num_processes * local_devices}; make "
        "num_processes * local_devices equal pp*dp*tp of the mesh"
      )
  return Cluster(num_processes, process_id, coordinator, local_devices, source)


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_devices: int | None = None,
  mesh_devices: int | None = None,
) -> Cluster | None:
  """Join the multi-process run (see `resolve` for where the values come from) with
  `jax.distributed.initialize`; None (and nothing done) for a single-process run. On the CPU
  platform each process exposes `local_devices` devices (default mesh_devices / num_processes):
  `jax_num_cpu_devices`, which wins over XLA_FLAGS' --xla_force_host_platform_device_count and does
  nothing on GPU/TPU. Call it before any jax computation."""
  cluster = resolve(coordinator, num_processes, process_id, local_devices, mesh_devices)
  if cluster is None:
    return None
  n_local = cluster.local_devices
  if n_local is None and mesh_devices is not None and cluster.num_processes:
    n_local = mesh_devices // cluster.num_processes
  if n_local is not None:
    jax.config.update("jax_num_cpu_devices", n_local)
  if cluster.coordinator is None:  # a detected cluster: JAX reads its own variables
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id)
  return Cluster(jax.process_count(), jax.process_index(), cluster.coordinator, n_local, cluster.source)


def is_main_process() -> bool:
  """True on process 0 (the one that logs and writes run files); always True single-process."""
  return jax.process_index() == 0


def local_rows(sharding, global_shape) -> np.ndarray:
  """The global batch rows (dim 0) this process's devices hold under `sharding`, ascending: what it
  loads, in the order `jax.make_array_from_process_local_data` expects its local data."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    rows.update(range(*index[0].indices(global_shape[0])))
  return np.array(sorted(rows), np.int64)


def global_batch(sharding, local: dict, global_shape) -> dict:
  """{name: global jax.Array [B, ...]} from this process's rows `local[name]` (the rows
  `local_rows(sharding, global_shape)` names, in that order). Single-process: the whole batch, placed
  shard by shard on its devices."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_shape[0], *np.shape(v)[1:]))
    for k, v in local.items()
  }
