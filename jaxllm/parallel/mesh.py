"""One jax Mesh for attention (dp x tp) and MoE (edp x ep x etp) on the same devices.

MoE Parallel Folding (Megatron Core, 2025): per pipeline stage the n = dp*tp devices are factored
twice, attention as (dp, tp) and MoE as (edp, ep, etp), inner-most last. The physical mesh axes are
the common refinement of both: cumulative sizes from the inner end are boundaries, their union must
be a divisibility chain, and each segment between consecutive boundaries is one physical axis.
Every logical parallel dim is then a tuple of physical axes (outer to inner). FSDP (mesh.fsdp) is
the outer fsdp ways of dp, a boundary of its own.
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

PARALLEL_DIMS = ("pp", "dp", "tp", "edp", "ep", "etp", "fsdp")


@dataclass(frozen=True)
class MeshPlan:
  cfg: MeshConfig
  axis_names: tuple[str, ...]  # physical axes, outer to inner; 'pp' first
  axis_sizes: tuple[int, ...]
  dims: dict[str, tuple[str, ...]]  # parallel dim ('dp', 'tp', 'ep', ...) -> physical axes

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
  # FSDP takes the outer fsdp ways of dp: there it lines up with edp, so the expert weights
  # (replicated over edp) are sharded by it too, not only the dense ones.
  attn = _boundaries([cfg.fsdp, cfg.dp // cfg.fsdp, cfg.tp])
  moe = _boundaries([cfg.edp, cfg.ep, cfg.etp])
  bounds = sorted(attn | moe)
  for lo, hi in zip(bounds, bounds[1:]):
    if hi % lo:
      raise ConfigError(
        f"mesh folding tp={cfg.tp} dp={cfg.dp} (fsdp={cfg.fsdp}) | ep={cfg.ep} etp={cfg.etp} (edp={cfg.edp}) "
        "has no common "
        f"device order: group sizes {sorted(attn)} (attention) and {sorted(moe)} (MoE) must nest "
        f"(each divide the next), but {lo} does not divide {hi}. Sizes that work for ep*etp with tp={cfg.tp}: "
        f"{_working_ep_etp(cfg)}"
      )
  # Segment i covers boundaries [bounds[i], bounds[i+1]); name inner-most f0.
  segs = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
  names = [f"f{i}" for i in range(len(segs))]

  def axes_for(lo, hi):
    return tuple(reversed([nm for nm, (a, b) in zip(names, segs) if a >= lo and b <= hi]))

  dims = {
    "pp": ("pp",) if cfg.pp > 1 else (),
    "tp": axes_for(1, cfg.tp),
    "dp": axes_for(cfg.tp, n),
    "etp": axes_for(1, cfg.etp),
    "ep": axes_for(cfg.etp, cfg.etp * cfg.ep),
    "edp": axes_for(cfg.etp * cfg.ep, n),
    "fsdp": axes_for(n // cfg.fsdp, n),
  }
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
      "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts"
    )
  return Mesh(
    device_grid(plan.axis_sizes, devices, dcn_axis_sizes(plan)),
    plan.axis_names,
    axis_types=(AxisType.Auto,) * len(plan.axis_names),
  ), plan


def device_grid(axis_sizes, devices, dcn_sizes=None) -> np.ndarray:
  """The devices laid out as the mesh, inner axes (tp, ep) varying fastest. `mesh_utils` orders them
  by the physical topology on TPU, so the inner axes land on neighbouring chips of the ICI torus; on
  GPU by device id (XLA's topology-aware global numbering: a node's NVLink peers are contiguous); on
  CPU in the given order. A shape it cannot map onto the physical torus falls back to the given order.

  `dcn_sizes` (from `dcn_axis_sizes`: mesh.dcn_pp, mesh.dcn_dp) says how many ways of each axis cross
  the slow network between granules (TPU slices, else processes = hosts). When they are > 1 and the
  devices span more than one granule, `create_hybrid_device_mesh` puts each granule's devices in one
  block of the mesh: axis a is dcn_sizes[a] blocks of axis_sizes[a] // dcn_sizes[a] granule-local
  ways, so the axes without a dcn factor (tp, ep, etp) stay inside one host/slice. Devices in one
  granule (one host, the emulated CPU mesh) are laid out as without them."""
  axis_sizes = tuple(int(s) for s in axis_sizes)
  dcn = tuple(int(d) for d in dcn_sizes) if dcn_sizes is not None else (1,) * len(axis_sizes)
  n_dcn = int(np.prod(dcn, dtype=np.int64))
  if n_dcn > 1:
    attr, granules = device_granules(devices)
    if len(granules) > 1:
      return _hybrid_grid(axis_sizes, dcn, devices, attr, granules)
  try:
    return mesh_utils.create_device_mesh(axis_sizes, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError):
    return np.array(devices).reshape(axis_sizes)


def device_granules(devices) -> tuple[str, list[list]]:
  """The devices grouped by the units the slow network (DCN) joins, in key order: TPU slices
  (`slice_index`) when the devices span more than one slice, else processes (`process_index`, one
  per host in a multi-host run). Returns the attribute used and the groups."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  attr = "slice_index" if None not in slices and len(slices) > 1 else "process_index"
  groups: dict = {}
  for d in devices:
    groups.setdefault(getattr(d, attr), []).append(d)
  return attr, [groups[k] for k in sorted(groups)]


def dcn_axis_sizes(plan: MeshPlan) -> tuple[int, ...]:
  """How many ways of each physical axis (plan.axis_names order) cross hosts/slices: mesh.dcn_pp on
  'pp', mesh.dcn_dp on dp's physical axes outer-first (an axis takes all of its size while the factor
  left is a multiple of it, or the factor left when that divides it). Errors if dcn_dp cannot be
  placed so, or would land on an axis of tp, ep or etp (their collectives must stay inside a
  host/slice); the message lists the dcn_dp values that work."""
  cfg = plan.cfg
  placed, why = _place_dcn_dp(plan, cfg.dcn_dp)
  if placed is None:
    sizes = dict(zip(plan.axis_names, plan.axis_sizes))
    ok = [k for k in range(1, cfg.dp + 1) if cfg.dp % k == 0 and _place_dcn_dp(plan, k)[0] is not None]
    raise ConfigError(
      f"mesh.dcn_dp={cfg.dcn_dp} cannot go across hosts/slices on mesh {cfg.name!r}: dp's physical axes "
      f"(outer to inner) {[(a, sizes[a]) for a in plan.dims['dp']]} take it outer-first, but {why}. "
      f"dcn_dp values that work here: {ok}"
    )
  dcn = dict.fromkeys(plan.axis_names, 1)
  dcn["pp"] = cfg.dcn_pp
  dcn.update(placed)
  return tuple(dcn[a] for a in plan.axis_names)


def _place_dcn_dp(plan: MeshPlan, k: int) -> tuple[dict[str, int] | None, str]:
  """({dp physical axis: its dcn factor}, '') or (None, why not) for dcn_dp = k."""
  sizes = dict(zip(plan.axis_names, plan.axis_sizes))
  inner = {a: d for d in ("tp", "ep", "etp") for a in plan.dims.get(d, ())}
  out: dict[str, int] = {}
  for a in plan.dims["dp"]:
    if k == 1:
      break
    s = sizes[a]
    if s % k == 0:
      out[a], k = k, 1
    elif k % s == 0:
      out[a], k = s, k // s
    else:
      return None, f"axis {a} of size {s} neither divides nor is divided by the factor {k} left to place"
    if a in inner:
      return None, (
        f"axis {a} is also {inner[a]}'s, whose collectives must stay on the fast network inside one host/slice"
      )
  if k != 1:
    return None, f"a factor {k} is left after all of dp's axes"
  return out, ""


def _hybrid_grid(axis_sizes, dcn, devices, attr, granules) -> np.ndarray:
  n_dcn = int(np.prod(dcn, dtype=np.int64))
  unit = "slices" if attr == "slice_index" else "hosts (processes)"
  if len(granules) != n_dcn:
    raise ConfigError(
      f"the mesh puts {n_dcn} ways across hosts/slices (mesh.dcn_pp * mesh.dcn_dp; per axis {dcn}) but the "
      f"{len(devices)} devices span {len(granules)} {unit}; set mesh.dcn_pp * mesh.dcn_dp = {len(granules)}, "
      f"or both to 1 to ignore host boundaries"
    )
  if len({len(g) for g in granules}) > 1:
    raise ConfigError(
      f"the {unit} hold different numbers of devices {[len(g) for g in granules]}; a mesh "
      "across hosts/slices needs the same number on each"
    )
  ici = tuple(s // d for s, d in zip(axis_sizes, dcn))
  try:
    return mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=attr == "process_index", allow_split_physical_axes=True
    )
  except (ValueError, NotImplementedError):
    # A granule that cannot be mapped onto its torus keeps its given order (as device_grid does).
    per_granule = [device_grid(ici, g) for g in granules]

    def nest(idx):
      return per_granule[int(idx)] if np.ndim(idx) == 0 else [nest(i) for i in idx]

    return np.block(nest(np.arange(n_dcn).reshape(dcn)))


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
  head = (
    f"mesh {c.name}: pp={c.pp} vpp={c.vpp} dp={c.dp} (fsdp={c.fsdp}) tp={c.tp} | edp={c.edp} ep={c.ep} etp={c.etp}  "
    f"axes {dict(zip(plan.axis_names, plan.axis_sizes))}  "
    + " ".join(f"{d}={plan.dims[d]}" for d in PARALLEL_DIMS if plan.dims[d])
  )
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
        bounds = sorted(_boundaries([cfg.fsdp, cfg.dp // cfg.fsdp, cfg.tp]) | _boundaries([n // (ep * etp), ep, etp]))
        if all(b % a == 0 for a, b in zip(bounds, bounds[1:])):
          ok.append((ep, etp))
  return ok
