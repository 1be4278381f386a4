"""Serving over a device mesh: the engine on tp (and ep for MoE) gives the greedy tokens of the
single-device full forward, with chunked prefill, decode and radix reuse on the mesh.

dp > 1 is covered too: the engine folds its ragged token row into dp rows (steps.mesh_rows) so the
expert-parallel dispatch's batch/token divisibility holds."""

import jax
import pytest
from test_serve import DENSE, GEN, MOE, PINNED, full_forward_greedy, params_of, shared_prefix_prompts

from jaxllm.config import MeshConfig
from jaxllm.parallel import build_mesh
from jaxllm.serve.engine import Engine
from jaxllm.serve.sampling import SamplingParams

MESHES = {
  "dense-dp4-tp2": (DENSE, MeshConfig(dp=4, tp=2)),
  "moe-tp2-ep2": (MOE, MeshConfig(tp=2, ep=2)),
  "moe-dp2-tp2-ep4": (MOE, MeshConfig(dp=2, tp=2, ep=4)),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_greedy_equals_single_device(name):
  cfg, mc = MESHES[name]
  mesh, plan = build_mesh(mc, jax.devices()[: mc.num_devices])
  prompts = shared_prefix_prompts(5, seed=5)
  want = full_forward_greedy(cfg, prompts, GEN)
  eng = Engine(cfg, params_of(cfg), **PINNED, chunk_size=16, policy="lpm", mesh=mesh, plan=plan)
  got = eng.generate(prompts, SamplingParams(max_tokens=GEN))
  assert [r.output for r in got] == want
  assert sum(r.cache_hit for r in got) > 0  # the radix cache works on the mesh too
  eng.sched.check()
  # The weights really are split: heads over tp, experts over ep.
  assert eng.params["layers"]["wq"].sharding.spec[2] is not None
  if cfg.is_moe:
    assert eng.params["layers"]["w_gate"].sharding.spec[1] is not None
  assert eng.rows == mc.dp
  assert all(f.traces <= 1 for f in eng._fns.values())  # one shape per step function


def test_mesh_rejects_pipeline():
  mesh, plan = build_mesh(MeshConfig(pp=2, dp=1, tp=1, microbatches=2), jax.devices()[:2])
  with pytest.raises(ValueError, match="pp"):
    Engine(DENSE, params_of(DENSE), **PINNED, mesh=mesh, plan=plan)


def test_pallas_on_tp_mesh_runs_on_local_heads():
  """serve.attention=pallas on tp=2 (interpret mode): the greedy tokens equal the single-device full
  forward, and the kernels run inside shard_map on each device's own kv head of the pool (on a chip
  a Pallas kernel is an opaque custom call: outside shard_map SPMD would replicate the pool around
  it; interpret mode lowers to plain ops, so the check is on the manual region's local shapes)."""
  import numpy as np

  from jaxllm.model import hooks
  from jaxllm.parallel import mesh_hooks

  mesh, plan = build_mesh(MeshConfig(tp=2), jax.devices()[:2])
  prompts = shared_prefix_prompts(3, seed=8)
  kw = dict(page_size=8, num_pages=48, max_running=4, chunk_size=16, decode_steps=1, min_seqs=4, min_tokens=16)
  eng = Engine(DENSE, params_of(DENSE), **kw, attention="pallas", mesh=mesh, plan=plan)
  got = eng.generate(prompts, SamplingParams(max_tokens=3))
  assert [r.output for r in got] == full_forward_greedy(DENSE, prompts, 3)
  K, L, P, Z, H = eng.k_pages.shape
  assert K == 2 and eng.k_pages.sharding.spec[0] is not None  # kv heads split over tp
  R, z = 4, lambda *s: np.zeros(s, np.int32)
  meta = {
    "slots": z(R),
    "kv_lens": z(R),
    "page_table": z(R, eng.M),
    "cu_q_lens": z(R + 1),
    "num_seqs": np.int32(0),
    "last_idx": z(R),
  }
  with jax.set_mesh(mesh), hooks.using(**mesh_hooks(mesh, plan, DENSE)):
    text = (
      eng._fns["decode"]
      .fn.lower(eng.params, eng.k_pages, eng.v_pages, eng.pen.store, z(R), z(R), meta, eng._samp([], R, [], []))
      .as_text()
    )
  regions = [l for l in text.splitlines() if "sdy.manual_computation" in l]
  assert regions  # (the layer scan holds one)
  assert all(f"tensor<1x{L * P}x{Z}x{H}x" in l for l in regions)  # the local pool view: 1 kv head
