"""Hugging Face safetensors <-> jaxllm parameter tree: the rename table and slice-wise reading.

Every jaxllm leaf is a stack (over layers, and for per-expert files over experts) of one HF tensor
per unit, transposed/reshaped. A `Source` records that mapping as `groups`: for each jaxllm dim
(after the stack dims), which HF dim it comes from, the sizes that dim splits into (q_proj's N*H
rows become the (N, H) dims of wq) and an offset (the gate half of a fused gate_up_proj). From that
one description we compute the expected HF names and shapes (to check a directory before loading
anything), read any rectangular block of the jaxllm array from the files (so each device reads only
its own shard: `jax.make_array_from_callback` + safetensors `get_slice`), and write the HF tensors
back on export.

Shapes: the package legend in jaxllm/__init__.py (L, E, D, N, K, H, F, V); `Fm` and `Fs` name the
expert and shared-expert hidden widths (both F of their MLP). HF nn.Linear weights are [out, in];
jaxllm's are [in, ...out].
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.io.hf_config import Family


@dataclass(frozen=True)
class Group:
  hf_dim: int  # the HF tensor dim this jaxllm dim (or dim group) comes from
  sizes: tuple[int, ...]  # jaxllm dims it splits into, row-major (e.g. (N, H) from N*H)
  offset: int = 0  # start along hf_dim (fused gate_up_proj: up starts at Fm)


@dataclass(frozen=True)
class Source:
  pattern: str  # HF name; {l} layer, {e} expert
  stack: tuple[str, ...]  # leading jaxllm dims iterated over files: (), ("l",) or ("l", "e")
  groups: tuple[Group, ...]  # the remaining jaxllm dims, in jaxllm order
  hf_shape: tuple[int, ...]  # shape of each HF tensor

  def names(self, L: int, E: int):
    """(HF name, stack index) for every unit, in jaxllm stack order."""
    ranges = [range(L) if s == "l" else range(E) for s in self.stack]
    for idx in itertools.product(*ranges):
      yield self.pattern.format(**dict(zip(self.stack, idx))), idx


def _lin(pattern, stack, out_sizes, in_sizes, out_first=False):
  """An nn.Linear weight [prod(out), prod(in)] -> jaxllm [*in, *out] (or [*out, *in] if out_first)."""
  o, i = Group(0, out_sizes), Group(1, in_sizes)
  return Source(pattern, stack, (o, i) if out_first else (i, o), (int(np.prod(out_sizes)), int(np.prod(in_sizes))))


def _vec(pattern, stack, sizes):
  return Source(pattern, stack, (Group(0, sizes),), (int(np.prod(sizes)),))


def weight_table(cfg: ModelConfig, fam: Family, fused: bool = False) -> dict[tuple[str, ...], Source]:
  """jaxllm param path -> Source, for this config and family; `fused` reads transformers-5 style
  3D expert tensors (mlp.experts.gate_up_proj [E, 2Fm, D], mlp.experts.down_proj [E, D, Fm])."""
  D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size
  l, le = ("l",), ("l", "e")
  a = "model.layers.{l}.self_attn."
  t = {
    ("embed",): Source("model.embed_tokens.weight", (), (Group(0, (V,)), Group(1, (D,))), (V, D)),
    ("final_norm",): _vec("model.norm.weight", (), (D,)),
    ("layers", "attn_norm"): _vec("model.layers.{l}.input_layernorm.weight", l, (D,)),
    ("layers", "mlp_norm"): _vec("model.layers.{l}.post_attention_layernorm.weight", l, (D,)),
    ("layers", "wq"): _lin(a + "q_proj.weight", l, (N, H), (D,)),
    ("layers", "wk"): _lin(a + "k_proj.weight", l, (K, H), (D,)),
    ("layers", "wv"): _lin(a + "v_proj.weight", l, (K, H), (D,)),
    ("layers", "wo"): _lin(a + "o_proj.weight", l, (D,), (N, H)),
  }
  if not cfg.tie_embeddings:
    t[("lm_head",)] = _lin("lm_head.weight", (), (V,), (D,))
  if cfg.qkv_bias:
    for name, heads in (("q", N), ("k", K), ("v", K)):
      t[("layers", "b" + name)] = _vec(a + name + "_proj.bias", l, (heads, H))
  if cfg.qk_norm:
    t[("layers", "q_norm")] = _vec(a + "q_norm.weight", l, (H,))
    t[("layers", "k_norm")] = _vec(a + "k_norm.weight", l, (H,))
  m = "model.layers.{l}.mlp."
  if not cfg.is_moe:
    t[("layers", "w_gate")] = _lin(m + "gate_proj.weight", l, (F,), (D,))
    t[("layers", "w_up")] = _lin(m + "up_proj.weight", l, (F,), (D,))
    t[("layers", "w_down")] = _lin(m + "down_proj.weight", l, (D,), (F,))
    return t
  E, Fm = cfg.n_experts, cfg.resolved_moe_d_ff
  mixtral_files = fam.moe == "mixtral" and not fused  # transformers 5 renames Mixtral's module to mlp
  moe = "model.layers.{l}.block_sparse_moe." if mixtral_files else m
  t[("layers", "router")] = _lin(moe + "gate.weight", l, (E,), (D,))
  if fused:
    gate_up, down = moe + "experts.gate_up_proj", moe + "experts.down_proj"
    t[("layers", "w_gate")] = Source(gate_up, l, (Group(0, (E,)), Group(2, (D,)), Group(1, (Fm,))), (E, 2 * Fm, D))
    t[("layers", "w_up")] = Source(gate_up, l, (Group(0, (E,)), Group(2, (D,)), Group(1, (Fm,), Fm)), (E, 2 * Fm, D))
    t[("layers", "w_down")] = Source(down, l, (Group(0, (E,)), Group(2, (Fm,)), Group(1, (D,))), (E, D, Fm))
  else:
    g, u, d = ("w1", "w3", "w2") if mixtral_files else ("gate_proj", "up_proj", "down_proj")
    t[("layers", "w_gate")] = _lin(moe + "experts.{e}." + g + ".weight", le, (Fm,), (D,))
    t[("layers", "w_up")] = _lin(moe + "experts.{e}." + u + ".weight", le, (Fm,), (D,))
    t[("layers", "w_down")] = _lin(moe + "experts.{e}." + d + ".weight", le, (D,), (Fm,))
  if cfg.shared_expert_d_ff:
    Fs, s = cfg.shared_expert_d_ff, m + "shared_expert."
    t[("layers", "shared_gate")] = _lin(s + "gate_proj.weight", l, (Fs,), (D,))
    t[("layers", "shared_up")] = _lin(s + "up_proj.weight", l, (Fs,), (D,))
    t[("layers", "shared_down")] = _lin(s + "down_proj.weight", l, (D,), (Fs,))
    if cfg.shared_expert_gate:  # nn.Linear(D, 1): [1, D] -> [D]
      t[("layers", "shared_expert_gate")] = Source(m + "shared_expert_gate.weight", l, (Group(1, (D,)),), (1, D))
  return t


# ---------------------------------------------------------------------------------------------
# The files of a model directory

# Buffers some older checkpoints saved beside the parameters; they are recomputed, not weights.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class SafetensorsDir(contextlib.AbstractContextManager):
  """All tensors of a directory (single file or sharded with model.safetensors.index.json), opened
  lazily with safetensors' numpy backend: headers only until a slice is read."""

  def __init__(self, model_dir: str):
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "*.safetensors")))
      if not files:
        raise ValueError(
          f"{model_dir}: no *.safetensors weights (and no model.safetensors.index.json); "
          "jaxllm reads safetensors only (convert .bin with transformers' save_pretrained)"
        )
    self._stack = contextlib.ExitStack()
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._slices = {}
    for name in files:
      path = os.path.join(model_dir, name)
      if not os.path.exists(path):
        raise ValueError(f"{index} lists {name}, which does not exist in {model_dir}")
      handle = self._stack.enter_context(safe_open(path, framework="numpy"))
      for key in handle.keys():
        sl = handle.get_slice(key)
        self.shapes[key] = tuple(sl.get_shape())
        self._slices[key] = sl

  def __exit__(self, *exc):
    self._stack.close()
    return False

  def read(self, name: str, box: tuple[slice, ...]) -> np.ndarray:
    return self._slices[name][box]


def check_names(table: dict, files: dict[str, tuple], cfg: ModelConfig, where: str) -> None:
  """Every expected tensor present with its shape, nothing left over; one error listing it all."""
  missing, wrong, expected = [], [], set()
  for src in table.values():
    for name, _ in src.names(cfg.n_layers, cfg.n_experts):
      expected.add(name)
      if name not in files:
        missing.append(name)
      elif files[name] != src.hf_shape:
        wrong.append(f"{name} has shape {list(files[name])}, expected {list(src.hf_shape)}")
  unused = sorted(
    n
    for n in files
    if n not in expected
    and not IGNORED.match(n)
    # transformers also ignores a stored lm_head when the embeddings are tied
    and not (cfg.tie_embeddings and n == "lm_head.weight")
  )
  problems = []
  for title, items in (("missing tensors", missing), ("mis-shaped tensors", wrong), ("unused tensors", unused)):
    if items:
      shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
      problems.append(f"{title} ({len(items)}): " + ", ".join(shown))
  if problems:
    raise ValueError(f"{where}: the weights do not match the config, nothing was loaded. " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Reading blocks and writing units


def _norm(index, shape) -> list[range]:
  return [range(*s.indices(n)) if isinstance(s, slice) else range(s, s + 1) for s, n in zip(index, shape)]


def read_block(src: Source, files: SafetensorsDir, shape: tuple[int, ...], index, dtype) -> np.ndarray:
  """The block `index` (a tuple of slices) of the jaxllm array of `shape` that `src` describes."""
  rngs = _norm(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape)
  ns = len(src.stack)
  stack_r, unit_r = rngs[:ns], rngs[ns:]
  # Per HF dim: flat HF indices of the requested jaxllm ranges of the group stored there, and the
  # bounding box of HF rows to read (contiguous for every slice a mesh asks for).
  flat, box = {}, []
  for g, first in zip(src.groups, itertools.accumulate([len(g.sizes) for g in src.groups], initial=0)):
    parts = unit_r[first : first + len(g.sizes)]
    strides = np.cumprod((g.sizes[1:] + (1,))[::-1])[::-1]
    idx = g.offset + sum(
      np.asarray(r).reshape([-1 if i == j else 1 for j in range(len(parts))]) * st
      for i, (r, st) in enumerate(zip(parts, strides))
    )
    flat[g.hf_dim] = (np.asarray(idx).reshape(-1), [len(r) for r in parts])
  for d in range(len(src.hf_shape)):
    box.append(slice(int(flat[d][0].min()), int(flat[d][0].max()) + 1) if d in flat else slice(0, 1))
  order = [g.hf_dim for g in src.groups]
  out = np.empty([len(r) for r in rngs], dtype)
  for pos in itertools.product(*[range(len(r)) for r in stack_r]):
    unit = dict(zip(src.stack, (r[p] for r, p in zip(stack_r, pos))))
    t = files.read(src.pattern.format(**unit), tuple(box))
    for d in range(len(src.hf_shape)):  # pick the requested rows of each grouped dim
      t = np.take(t, flat[d][0] - box[d].start, axis=d) if d in flat else t
    t = t.reshape([n for d in range(len(src.hf_shape)) for n in (flat[d][1] if d in flat else [1])])
    t = t.squeeze(axis=tuple(_axis_of(src, d) for d in range(len(src.hf_shape)) if d not in flat))
    # now dims are in HF dim order, each group expanded; permute into jaxllm group order
    starts = {
      d: s for d, s in zip(sorted(flat), itertools.accumulate([len(flat[d][1]) for d in sorted(flat)], initial=0))
    }
    perm = [starts[d] + i for d in order for i in range(len(flat[d][1]))]
    out[pos] = np.transpose(t, perm).astype(dtype)
  return out


def _axis_of(src: Source, hf_dim: int) -> int:
  """Position of a missing (size-1) HF dim after each grouped dim was expanded to its sizes."""
  sizes = {g.hf_dim: len(g.sizes) for g in src.groups}
  return sum(sizes.get(d, 1) for d in range(hf_dim))


def write_units(src: Source, array: np.ndarray, L: int, E: int):
  """Inverse of reading: yield (HF name, HF tensor) for every unit of the full jaxllm `array`."""
  if any(g.offset for g in src.groups):
    raise ValueError(f"{src.pattern}: export writes per-expert tensors, not fused ones")
  order = sorted(range(len(src.groups)), key=lambda i: src.groups[i].hf_dim)
  for name, idx in src.names(L, E):
    unit = array[idx] if idx else array
    starts = list(itertools.accumulate([len(g.sizes) for g in src.groups], initial=0))
    perm = [a for i in order for a in range(starts[i], starts[i + 1])]
    unit = np.transpose(unit, perm)
    yield name, np.ascontiguousarray(unit.reshape(src.hf_shape))
