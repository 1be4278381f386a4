"""One jax Mesh for attention (dp x tp) and MoE (edp x ep x etp) on the same devices.

MoE Parallel Folding (Megatron Core, 2025): per pipeline stage the n = dp*tp devices are factored
twice, attention as (dp, tp) and MoE as (edp, ep, etp), inner-most last. The physical mesh axes are
the common refinement of both: cumulative sizes from the inner end are boundaries, their union must
be a divisibility chain, and each segment between consecutive boundaries is one physical axis.
Every logical parallel dim is then a tuple of physical axes (outer to inner).
Example: tp=2 dp=4, etp=1 ep=4 edp=2 -> boundaries {1,2,4,8} -> axes f2,f1,f0 of size 2:
tp=(f0,), dp=(f2,f1), ep=(f1,f0), edp=(f2,).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxllm.config import ConfigError, MeshConfig

PARALLEL_DIMS = ("pp", "dp", "tp", "edp", "ep", "etp")


@dataclass(frozen=True)
class MeshPlan:
  cfg: MeshConfig
  axis_names: tuple[str, ...]          # physical axes, outer to inner; 'pp' first
  axis_sizes: tuple[int, ...]
  dims: dict[str, tuple[str, ...]]     # parallel dim ('dp', 'tp', 'ep', ...) -> physical axes

  def size(self, dim: str) -> int:
    sizes = dict(zip(self.axis_names, self.axis_sizes))
    return int(np.prod([sizes[a] for a in self.dims[dim]], dtype=np.int64))


def live_axes(plan: MeshPlan, dim: str) -> tuple[str, ...]:
  """The physical axes of a parallel dim that actually split something (size > 1)."""
  sizes = dict(zip(plan.axis_names, plan.axis_sizes))
  return tuple(a for a in plan.dims[dim] if sizes[a] > 1)


def plan_mesh(cfg: MeshConfig) -> MeshPlan:
  """Compute the physical axes refining both factorizations, or explain why none exists."""
  n = cfg.dp * cfg.tp
  attn = _boundaries([cfg.dp, cfg.tp])
  moe = _boundaries([cfg.edp, cfg.ep, cfg.etp])
  bounds = sorted(attn | moe)
  for lo, hi in zip(bounds, bounds[1:]):
    if hi % lo:
      raise ConfigError(
        f"mesh folding tp={cfg.tp} dp={cfg.dp} | ep={cfg.ep} etp={cfg.etp} (edp={cfg.edp}) has no common "
        f"device order: group sizes {sorted(attn)} (attention) and {sorted(moe)} (MoE) must nest "
        f"(each divide the next), but {lo} does not divide {hi}. Sizes that work for ep*etp with tp={cfg.tp}: "
        f"{_working_ep_etp(cfg)}")
  # Segment i covers boundaries [bounds[i], bounds[i+1]); name inner-most f0.
  segs = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
  names = [f"f{i}" for i in range(len(segs))]

  def axes_for(lo, hi):
    return tuple(reversed([nm for nm, (a, b) in zip(names, segs) if a >= lo and b <= hi]))

  dims = {"pp": ("pp",) if cfg.pp > 1 else (),
          "tp": axes_for(1, cfg.tp), "dp": axes_for(cfg.tp, n),
          "etp": axes_for(1, cfg.etp), "ep": axes_for(cfg.etp, cfg.etp * cfg.ep),
          "edp": axes_for(cfg.etp * cfg.ep, n)}
  axis_names = ("pp",) + tuple(reversed(names))
  axis_sizes = (cfg.pp,) + tuple(reversed([b // a for a, b in segs]))
  return MeshPlan(cfg, axis_names, axis_sizes, dims)


def build_mesh(cfg: MeshConfig, devices=None) -> tuple[Mesh, MeshPlan]:
  """The run's Mesh (Auto axis types) and its plan. Errors if the device count does not match."""
  plan = plan_mesh(cfg)
  devices = list(devices if devices is not None else jax.devices())
  if len(devices) != cfg.num_devices:
    raise ConfigError(
      f"mesh {cfg.name!r} needs pp*dp*tp = {cfg.pp}*{cfg.dp}*{cfg.tp} = {cfg.num_devices} devices but "
      f"{len(devices)} exist ({devices[0].platform}); pick a mesh preset for {len(devices)} devices or "
      "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts")
  return Mesh(device_grid(plan.axis_sizes, devices), plan.axis_names,
              axis_types=(AxisType.Auto,) * len(plan.axis_names)), plan


def device_grid(axis_sizes, devices) -> np.ndarray:
  """The devices laid out as the mesh, inner axes (tp, ep) varying fastest. `mesh_utils` orders them
  by the physical topology on TPU, so the inner axes land on neighbouring chips of the ICI torus; on
  GPU by device id (XLA's topology-aware global numbering: a node's NVLink peers are contiguous); on
  CPU in the given order. A shape it cannot map onto the physical torus falls back to the given order."""
  try:
    return mesh_utils.create_device_mesh(tuple(axis_sizes), devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError):
    return np.array(devices).reshape(axis_sizes)


def rank_table(mesh: Mesh, plan: MeshPlan) -> list[tuple[int, dict[str, int]]]:
  """[(device id, {parallel dim: rank})] in mesh order, Megatron-style ranks per dim."""
  rows = []
  sizes = dict(zip(plan.axis_names, plan.axis_sizes))
  for coord in np.ndindex(*plan.axis_sizes):
    at = dict(zip(plan.axis_names, coord))
    ranks = {}
    for dim in PARALLEL_DIMS:
      r = 0
      for a in plan.dims[dim]:
        r = r * sizes[a] + at[a]
      ranks[dim] = r
    rows.append((int(mesh.devices[coord].id), ranks))
  return rows


def format_rank_table(mesh: Mesh, plan: MeshPlan) -> str:
  c = plan.cfg
  head = (f"mesh {c.name}: pp={c.pp} vpp={c.vpp} dp={c.dp} tp={c.tp} | edp={c.edp} ep={c.ep} etp={c.etp}  "
          f"axes {dict(zip(plan.axis_names, plan.axis_sizes))}  "
          + " ".join(f"{d}={plan.dims[d]}" for d in PARALLEL_DIMS if plan.dims[d]))
  lines = [head, "device " + " ".join(f"{d:>4}" for d in PARALLEL_DIMS)]
  for dev, ranks in rank_table(mesh, plan):
    lines.append(f"{dev:>6} " + " ".join(f"{ranks[d]:>4}" for d in PARALLEL_DIMS))
  return "\n".join(lines)


def _boundaries(sizes_outer_to_inner: list[int]) -> set[int]:
  out, acc = {1}, 1
  for s in reversed(sizes_outer_to_inner):
    acc *= s
    out.add(acc)
  return out


def _working_ep_etp(cfg: MeshConfig) -> list[tuple[int, int]]:
  n, ok = cfg.dp * cfg.tp, []
  for ep in range(1, n + 1):
    for etp in range(1, n // ep + 1):
      if n % (ep * etp) == 0:
        bounds = sorted(_boundaries([cfg.dp, cfg.tp]) | _boundaries([n // (ep * etp), ep, etp]))
        if all(b % a == 0 for a, b in zip(bounds, bounds[1:])):
          ok.append((ep, etp))
  return ok
