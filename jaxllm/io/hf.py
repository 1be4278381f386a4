"""Load a Hugging Face model directory into jaxllm parameters, and export them back.

Loading checks the whole directory first (config, every tensor name and shape) and only then reads
weights, so a bad directory fails with one error naming every problem and nothing half-loaded.
With `shardings`, each leaf is built by `jax.make_array_from_callback`: every device reads only its
own block of each tensor from the memory-mapped safetensors files, so a large model is never
copied whole into host memory, and torch is not needed.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import find_chat_template
from jaxllm.io.hf_config import FAMILIES, family_of, load_hf_config, model_config_to_hf, read_json
from jaxllm.io.hf_weights import SafetensorsDir, check_names, read_block, weight_table, write_units

# Files of a tokenizer (and its chat template / generation defaults) copied on export.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "generation_config.json",
)
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _flatten(tree: dict, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _same_paths(table: dict, tree_paths, what: str) -> None:
  extra, lacking = set(tree_paths) - set(table), set(table) - set(tree_paths)
  if extra or lacking:
    raise ValueError(
      f"{what}: parameters {sorted('.'.join(p) for p in extra)} have no HF name and "
      f"{sorted('.'.join(p) for p in lacking)} are not in the params; the rename table in "
      "jaxllm/io/hf_weights.py must cover exactly the model's parameters"
    )


# ModelConfig fields that do not change the weights: a run may set them differently from config.json.
RUN_FIELDS = ("name", "dtype", "param_dtype", "remat", "init_std", "aux_loss_coef", "z_loss_coef", "max_seq_len")


def load_hf(model_dir: str, shardings=None, cfg: ModelConfig | None = None, **overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from a Hugging Face directory.

  shardings: a pytree like the params (e.g. `jaxllm.parallel.param_shardings(model_def(cfg), mesh,
  plan)` for `cfg = load_hf_config(model_dir)`) to place every leaf directly on its devices; None puts
  the params on the default device. cfg: load into this config (e.g. the run's, with bf16 params or
  remat) after checking that it describes the same weights; `overrides` replace ModelConfig fields.
  """
  from jaxllm.model.params import model_def

  file_cfg = load_hf_config(model_dir, **overrides)
  if cfg is not None:
    differ = [
      f"{k}: run {getattr(cfg, k)!r} vs {model_dir} {getattr(file_cfg, k)!r}"
      for k in ModelConfig.__dataclass_fields__
      if k not in RUN_FIELDS and getattr(cfg, k) != getattr(file_cfg, k)
    ]
    if differ:
      raise ValueError(
        f"the model config does not match the checkpoint's config.json; start from "
        f"load_hf_config({model_dir!r}) and change only {RUN_FIELDS}. Differences: " + "; ".join(differ)
      )
  cfg = cfg or file_cfg
  fam = family_of(read_json(os.path.join(model_dir, "config.json")))
  abstract = _flatten(model_def(cfg).abstract_params())
  flat_sh = _flatten(shardings) if shardings is not None else None
  if flat_sh is not None and set(flat_sh) != set(abstract):
    raise ValueError(
      f"shardings do not match the params of {model_dir}: expected leaves "
      f"{sorted('.'.join(p) for p in abstract)}; build them from load_hf_config(model_dir)"
    )
  with SafetensorsDir(model_dir) as files:
    fused = any(name.endswith("experts.gate_up_proj") for name in files.shapes)
    table = weight_table(cfg, fam, fused)
    _same_paths(table, abstract, model_dir)
    check_names(table, files.shapes, cfg, model_dir)
    flat = {}
    for path, a in abstract.items():
      src, shape, dtype = table[path], a.shape, np.dtype(a.dtype)
      if flat_sh is None:
        flat[path] = jnp.asarray(read_block(src, files, shape, (), dtype))
      else:
        flat[path] = jax.make_array_from_callback(
          shape,
          flat_sh[path],
          lambda index, src=src, shape=shape, dtype=dtype: read_block(src, files, shape, index, dtype),
        )
  return cfg, _unflatten(flat)


def hf_tokenizer_path(model_dir: str) -> str | None:
  """Path of the directory's tokenizer.json, or None."""
  path = os.path.join(model_dir, "tokenizer.json")
  return path if os.path.exists(path) else None


def hf_chat_template(model_dir: str) -> str | None:
  """The chat template (Jinja source) of a model directory: chat_template.jinja, chat_template.json or
  tokenizer_config.json (jaxllm.data.tokenizer.find_chat_template)."""
  return find_chat_template(model_dir)


def export_hf(
  params: dict,
  cfg: ModelConfig,
  out_dir: str,
  tokenizer_dir: str | None = None,
  architecture: str | None = None,
  max_shard_bytes: int | None = None,
) -> str:
  """Write `params` as a Hugging Face directory: config.json, safetensors (sharded with an index
  when larger than max_shard_bytes), and the tokenizer files of `tokenizer_dir` if given.
  Experts are written per expert (the layout every transformers version reads). Returns out_dir."""
  from safetensors.numpy import save_file

  hf = model_config_to_hf(cfg, architecture)
  if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, "config.json")):
    src_cfg = read_json(os.path.join(tokenizer_dir, "config.json"))
    hf.update({k: src_cfg[k] for k in _TOKEN_IDS if src_cfg.get(k) is not None})
  table = weight_table(cfg, FAMILIES[hf["architectures"][0]], fused=False)
  flat = _flatten(params)
  _same_paths(table, flat, "export_hf")
  for path, src in table.items():
    expect = (
      ((cfg.n_layers,) if src.stack else ())
      + ((cfg.n_experts,) if len(src.stack) > 1 else ())
      + tuple(n for g in src.groups for n in g.sizes)
    )
    if tuple(flat[path].shape) != expect:
      raise ValueError(
        f"export_hf: param {'.'.join(path)} has shape {tuple(flat[path].shape)}, but the config implies {expect}"
      )
  os.makedirs(out_dir, exist_ok=True)
  # Plan shards from shapes alone, then write each as soon as its tensors are ready.
  units = [
    (name, int(np.prod(src.hf_shape)) * np.dtype(flat[path].dtype).itemsize)
    for path, src in table.items()
    for name, _ in src.names(cfg.n_layers, cfg.n_experts)
  ]
  total = sum(n for _, n in units)
  shards, size = [[]], 0
  for name, nbytes in units:
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  files = (
    ["model.safetensors"]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  shard_of = {name: i for i, names in enumerate(shards) for name in names}
  pending: dict[int, dict] = {}
  for path, src in table.items():
    array = np.asarray(jax.device_get(flat[path]))
    for name, tensor in write_units(src, array, cfg.n_layers, cfg.n_experts):
      i = shard_of[name]
      pending.setdefault(i, {})[name] = tensor
      if len(pending[i]) == len(shards[i]):
        save_file(pending.pop(i), os.path.join(out_dir, files[i]), metadata={"format": "pt"})
  if len(files) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": {n: files[shard_of[n]] for n, _ in units}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if tokenizer_dir:
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
        shutil.copyfile(src, os.path.join(out_dir, name))
  return out_dir
