"""One way to load a model for inference: `load_model(path)` takes a training run's checkpoints folder
or a Hugging Face model directory and returns its config, parameters, tokenizer and end-of-sequence ids.

Which kind `path` is comes from its contents: `config.json` beside `*.safetensors` is a Hugging Face
directory; numbered step folders (orbax) are a checkpoints folder, also found under a run's out_dir
(`path/checkpoints`). A checkpoint's tokenizer is the one its run trained with (train.tokenizer in the
saved config); a Hugging Face directory's is its tokenizer.json.

End-of-sequence ids (`eos_ids`) are the one rule every generating caller uses: a model may end a turn
with several tokens (Llama-3 and Qwen instruct models list them in generation_config.json), so all of
them stop generation, not just the tokenizer's one.

Sampling defaults (`generation_defaults`): a Hugging Face directory's generation_config.json may set
how the model is meant to be sampled (Llama-3-Instruct: temperature 0.6, top_p 0.9); the server uses
them for requests that leave a field out, as vLLM's `--generation-config auto` does.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import jax

from jaxllm.config import Config, ModelConfig
from jaxllm.data import load_tokenizer
from jaxllm.io.checkpoint import load_params, read_config
from jaxllm.io.hf import RUN_FIELDS, hf_chat_template, hf_tokenizer_path, load_hf
from jaxllm.io.hf_config import load_hf_config, read_json
from jaxllm.model.params import ModelDef, model_def

_FIX = (
  "pass a training run's checkpoints folder (train.out_dir/checkpoints) or a Hugging Face model "
  "directory (config.json + *.safetensors)"
)


class ModelLoadError(ValueError):
  """A path that cannot be loaded as a model; the message names it and says what to pass instead."""


@dataclass(frozen=True)
class LoadedModel:
  cfg: ModelConfig
  params: Any  # the model's parameter pytree, placed by `shardings` (default device without)
  tokenizer: Any  # encode/decode, vocab_size, bos_id/eos_id/pad_id (jaxllm.data)
  tokenizer_spec: str  # what load_tokenizer was given: "byte" or a tokenizer.json path
  eos_ids: tuple[int, ...]  # every end-of-sequence id the model can produce (see eos_ids)
  name: str  # the directory's name (the run's, for a checkpoints folder)
  chat_template: str | None  # Jinja source shipped with the model's tokenizer; None: the default template
  source: str  # where it came from, for messages
  run_config: Config | None  # a checkpoint's saved run config; None for a Hugging Face directory
  # Values for request fields a request leaves out: a Hugging Face directory's generation_config.json
  # sampling defaults (generation_defaults); for a checkpoint add_special_tokens=False, as its run
  # trained on text encoded without the tokenizer's BOS.
  request_defaults: dict = dataclasses.field(default_factory=dict)


def _is_hf_dir(path: str) -> bool:
  names = os.listdir(path)
  return "config.json" in names and any(
    n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names
  )


def _is_checkpoints_dir(path: str) -> bool:
  return os.path.isdir(path) and any(n.isdigit() and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))


def _token_ids(value, where: str) -> list[int]:
  """An `eos_token_id` entry: an int, a list of ints, or null."""
  values = value if isinstance(value, list) else [] if value is None else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise ModelLoadError(
      f"{where}: eos_token_id {value!r} is not an integer or a list of integers; fix or remove the entry"
    )
  return values


def eos_ids(vocab_size: int, tokenizer=None, model_dir: str | None = None) -> tuple[int, ...]:
  """Every end-of-sequence id of a model, in order of preference and without repeats: the
  generation_config.json `eos_token_id` (one id or a list), then the config.json one, of `model_dir` and
  of the directory of the tokenizer's tokenizer.json (a run started from a Hugging Face model keeps its
  ids); then the tokenizer's eos_id (named by tokenizer_config.json). Ids >= vocab_size are dropped: the
  model cannot produce them."""
  tok_path = getattr(tokenizer, "path", None)
  dirs = [d for d in (model_dir, tok_path and os.path.dirname(os.path.abspath(tok_path))) if d]
  ids = []
  for directory in dict.fromkeys(os.path.abspath(d) for d in dirs):
    for name in ("generation_config.json", "config.json"):
      path = os.path.join(directory, name)
      data = read_json(path) if os.path.isfile(path) else None
      if isinstance(data, dict):
        ids += _token_ids(data.get("eos_token_id"), path)
  eos = getattr(tokenizer, "eos_id", None)
  if eos is not None:
    ids.append(eos)
  return tuple(i for i in dict.fromkeys(ids) if 0 <= i < vocab_size)


# generation_config.json field -> (sampling field, check, what it must be). vLLM reads these same ones.
_GENERATION_FIELDS = {
  "temperature": ("temperature", lambda v: v >= 0, "a number >= 0"),
  "top_p": ("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]"),
  "top_k": ("top_k", lambda v: v >= -1 and float(v).is_integer(), "an integer >= 0 (0 or -1: off)"),
  "min_p": ("min_p", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
  "repetition_penalty": ("repetition_penalty", lambda v: v > 0, "a number > 0"),
  "max_new_tokens": ("max_tokens", lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
}


def generation_defaults(model_dir: str) -> dict:
  """The sampling defaults of a model directory's generation_config.json, as sampling field names:
  temperature, top_p, top_k, min_p, repetition_penalty and max_tokens (from max_new_tokens); {} without
  the file. Other fields (do_sample included, as in vLLM) are not read; a value out of range fails."""
  path = os.path.join(model_dir, "generation_config.json")
  data = read_json(path) if os.path.isfile(path) else None
  out = {}
  for key, (name, ok, must) in _GENERATION_FIELDS.items():
    v = data.get(key) if isinstance(data, dict) else None
    if v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
      raise ModelLoadError(f"{path}: {key}={v!r} must be {must}; fix or remove the entry")
    out[name] = int(v) if name in ("top_k", "max_tokens") else float(v)
  if out.get("top_k") == -1:
    out["top_k"] = 0
  return out


def _tokenizer(spec: str, path: str):
  try:
    return load_tokenizer(spec)
  except ValueError as e:
    raise ModelLoadError(f"the tokenizer of {path} does not load: {e}") from None


def _run_overrides(overrides: dict) -> None:
  wrong = sorted(set(overrides) - set(RUN_FIELDS))
  if wrong:
    raise ModelLoadError(f"load_model: {wrong} would change the weights; only {RUN_FIELDS} can be overridden")


def load_model(
  path: str,
  *,
  shardings: Callable[[ModelDef], Any] | None = None,
  tokenizer: str | None = None,
  step: int | None = None,
  **overrides,
) -> LoadedModel:
  """The model at `path`: a training checkpoints folder (or a run's out_dir holding one) or a Hugging
  Face model directory.

  shardings(model_def) -> a pytree of shardings like the params (e.g. `lambda m: param_shardings(m, mesh,
  plan)`) places every leaf directly on its devices; None puts the params on the default device.
  tokenizer: "byte" or a tokenizer.json path instead of the model's own. step: a checkpoint's step
  (default: the newest). overrides: ModelConfig fields that leave the weights as they are (RUN_FIELDS,
  e.g. max_seq_len=4096 or param_dtype="bfloat16")."""
  _run_overrides(overrides)
  if not os.path.isdir(path):
    raise ModelLoadError(f"{path}: no such directory; {_FIX}")
  if _is_hf_dir(path):
    if step is not None:
      raise ModelLoadError(f"{path} is a Hugging Face directory, which has no steps; drop step={step}")
    return _load_hf(path, shardings, tokenizer, overrides)
  for directory in (path, os.path.join(path, "checkpoints")):
    if _is_checkpoints_dir(directory):
      return _load_checkpoint(directory, shardings, tokenizer, step, overrides)
  if os.path.exists(os.path.join(path, "config.json")):
    raise ModelLoadError(f"{path} has config.json but no *.safetensors weights and no checkpoints; {_FIX}")
  raise ModelLoadError(f"{path} is neither a checkpoints folder nor a Hugging Face model directory; {_FIX}")


def _load_hf(path: str, shardings, tokenizer: str | None, overrides: dict) -> LoadedModel:
  spec = tokenizer or hf_tokenizer_path(path)
  if spec is None:
    raise ModelLoadError(
      f"{path} has no tokenizer.json; copy the model's tokenizer files (tokenizer.json, "
      'tokenizer_config.json) into it, or pass a tokenizer ("byte" or a tokenizer.json path)'
    )
  tok = _tokenizer(spec, path)
  placed = None if shardings is None else shardings(model_def(load_hf_config(path, **overrides)))
  cfg, params = load_hf(path, placed, **overrides)
  return LoadedModel(
    cfg,
    params,
    tok,
    spec,
    eos_ids(cfg.vocab_size, tok, path),
    os.path.basename(os.path.abspath(path)),
    hf_chat_template(path),
    f"Hugging Face model {path} (tokenizer {spec})",
    None,
    generation_defaults(path),
  )


def _load_checkpoint(
  directory: str, shardings, tokenizer: str | None, step: int | None, overrides: dict
) -> LoadedModel:
  spec = tokenizer or read_config(directory, step).train.tokenizer
  tok = _tokenizer(spec, directory)  # before the weights: a missing tokenizer fails at once
  config, params = load_params(directory, shardings, step)
  cfg = dataclasses.replace(config.model, **overrides)
  if cfg.param_dtype != config.model.param_dtype:
    params = jax.tree.map(lambda a: a.astype(cfg.param_dtype), params)
  full = os.path.abspath(directory)
  run = os.path.dirname(full) if os.path.basename(full) == "checkpoints" else full
  return LoadedModel(
    cfg,
    params,
    tok,
    spec,
    eos_ids(cfg.vocab_size, tok),
    os.path.basename(run),
    getattr(tok, "chat_template", None),  # the run's tokenizer's own template, if it has one
    f"checkpoint {directory} (tokenizer {spec})",
    config,
    {"add_special_tokens": False},
  )
