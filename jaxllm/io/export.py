"""Export a training run as a Hugging Face model directory: `python -m jaxllm.io.export CKPT_DIR OUT_DIR`.

Pretraining, SFT and RL runs save the same checkpoint layout (canonical parameters, so the mesh they
trained on does not matter); their newest step (or `--step N`) is loaded on one host device and written
by `export_hf` as config.json + safetensors (sharded above `--max-shard-size`), with:

  - the run's tokenizer: a Hugging Face tokenizer.json is copied with the files beside it
    (tokenizer_config.json, the chat template as chat_template.jinja or inside tokenizer_config.json,
    special_tokens_map.json, ...); a bare tokenizer.json gets a tokenizer_config.json naming the special
    tokens jaxllm uses. The byte tokenizer ("byte") has no file of its own, so an equivalent one is built:
    a `tokenizers` byte-level BPE without merges whose ids are the UTF-8 bytes (0..255), with bos/eos/pad
    at 256/257/258 named <|bos|>/<|eos|>/<|pad|> (the one difference from jaxllm's ByteTokenizer: those
    three names written in text encode to their ids, as every Hugging Face tokenizer's specials do);
  - the chat template jaxllm serves and fine-tunes the model with: the tokenizer's own, else
    jaxllm.data.chat.DEFAULT_TEMPLATE (in tokenizer_config.json), so apply_chat_template in transformers
    gives the token ids jaxllm's ChatFormat gives;
  - generation_config.json listing every end-of-sequence id (`jaxllm.io.load.eos_ids`: a list when there
    are several), so generation in transformers stops where jaxllm's does.

Reward-model checkpoints (a scalar head on the backbone, not a language model) are refused. The
directory is written beside OUT_DIR under a temporary name and renamed into place when complete, so an
interrupted export never leaves a half-written directory where a good one was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
import warnings

import jax

from jaxllm.data.chat import DEFAULT_TEMPLATE
from jaxllm.io.checkpoint import CheckpointError, manager, read_meta
from jaxllm.io.hf import export_hf, hf_chat_template
from jaxllm.io.hf_config import FAMILIES
from jaxllm.io.load import ModelLoadError, _is_checkpoints_dir, _is_hf_dir, load_model

REWARD_MODEL_KIND = "reward_model"  # meta["data"]["kind"] of a reward-model checkpoint (jaxllm.rl.reward_model.KIND)
DTYPES = ("bfloat16", "float32")
MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default (5GB)
_FIX = "pass a training run's out_dir or its checkpoints folder (train.out_dir/checkpoints)"
# Names of the byte tokenizer's specials in the exported tokenizer.json (jaxllm's ByteTokenizer has none).
BYTE_SPECIALS = (("bos_token", "<|bos|>", 256), ("eos_token", "<|eos|>", 257), ("pad_token", "<|pad|>", 258))
# jaxllm.io imports this module, so `python -m jaxllm.io.export` finds it imported before running it as
# __main__; runpy warns of that, but running it twice is harmless here (it defines names only).
warnings.filterwarnings("ignore", r"'jaxllm\.io\.export' found in sys\.modules", RuntimeWarning)


def export_run(
  ckpt_dir: str,
  out_dir: str,
  step: int | None = None,
  *,
  dtype: str | None = None,
  architecture: str | None = None,
  force: bool = False,
  max_shard_bytes: int | None = MAX_SHARD_BYTES,
  log=print,
) -> str:
  """Write the language model of a training run (its out_dir or checkpoints folder; step: default the
  newest) to `out_dir` as a Hugging Face directory. dtype: "bfloat16" or "float32" (default the run's
  param_dtype); architecture: one of jaxllm.io.FAMILIES (default inferred from the config). out_dir must
  be absent or empty unless `force`, which replaces it once the new directory is complete. `log` gets
  one line per thing worth knowing (what was written, what the tokenizer is). Returns out_dir."""
  directory = _checkpoints_dir(ckpt_dir)
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}; pass one of them or leave it out")
  if architecture is not None and architecture not in FAMILIES:
    raise ValueError(f"architecture {architecture!r} is not one of {', '.join(FAMILIES)}; pass one or leave it out")
  step = _step(directory, step)
  kind = (read_meta(directory, step).get("data") or {}).get("kind")
  if kind == REWARD_MODEL_KIND:
    raise ModelLoadError(
      f"{directory} (step {step}) is a reward model's checkpoint (a scalar score head, not a language model), "
      "which has no Hugging Face causal-LM form; export a pretraining, SFT or RL run's checkpoints instead"
    )
  out_dir = os.path.abspath(out_dir)
  _check_out_dir(out_dir, force, (directory,))
  overrides = {"param_dtype": dtype} if dtype else {}
  m = load_model(directory, shardings=_on_host, step=step, **overrides)
  tok_dir = None if m.tokenizer_spec == "byte" else os.path.dirname(os.path.abspath(m.tokenizer.path))
  _check_out_dir(out_dir, force, (directory, tok_dir) if tok_dir else (directory,))

  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f"{os.path.basename(out_dir)}.tmp-{secrets.token_hex(4)}")
  try:
    os.mkdir(tmp)
    export_hf(m.params, m.cfg, tmp, tokenizer_dir=tok_dir, architecture=architecture, max_shard_bytes=max_shard_bytes)
    if tok_dir is None:
      tok_note = _write_byte_tokenizer(tmp, m.cfg.max_seq_len)
    else:
      tok_note = _write_hf_tokenizer(tmp, m.tokenizer, m.cfg.max_seq_len)
    gen = _write_token_ids(tmp, m)
    _replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shards = sorted(n for n in os.listdir(out_dir) if n.endswith(".safetensors"))
  log(
    f"exported {m.source}, step {step}, as {_read_json(os.path.join(out_dir, 'config.json'))['architectures'][0]} "
    f"({m.cfg.param_dtype}, {len(shards)} safetensors file{'s' * (len(shards) > 1)}) to {out_dir}"
  )
  log(tok_note)
  log(f"generation_config.json: eos_token_id {gen.get('eos_token_id')}")
  return out_dir


def _checkpoints_dir(path: str) -> str:
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such directory; {_FIX}")
  for directory in (path, os.path.join(path, "checkpoints")):
    if _is_checkpoints_dir(directory):
      return os.path.abspath(directory)
  if _is_hf_dir(path):
    raise ModelLoadError(f"{path} is already a Hugging Face model directory; use it as it is, or {_FIX}")
  raise CheckpointError(f"{path} holds no numbered step folders (checkpoints); {_FIX}")


def _step(directory: str, step: int | None) -> int:
  steps = sorted(manager(directory, async_save=False).all_steps())
  if not steps:
    raise CheckpointError(
      f"{directory} holds no finished checkpoint (a run writes them every train.save_every steps and at the end)"
    )
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(f"{directory} has no step {step}; pass one of its steps {steps}, or leave step out (newest)")
  return step


def _on_host(mdef):
  """Every parameter on one host device: an export needs no accelerator, and host memory is the larger."""
  try:
    device = jax.devices("cpu")[0]
  except RuntimeError:  # the CPU backend is switched off (JAX_PLATFORMS without cpu)
    device = jax.devices()[0]
  one = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda _: one, mdef.abstract_params())


def _inside(path: str, directory: str) -> bool:
  """`path` is `directory` or lies under it."""
  path, directory = os.path.realpath(path), os.path.realpath(directory)
  return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _check_out_dir(out_dir: str, force: bool, sources) -> None:
  for src in sources:
    if _inside(src, out_dir) or _inside(out_dir, src):
      raise ValueError(
        f"output directory {out_dir} and {src}, which the export reads, contain one another; "
        "pass an output directory outside the run and its tokenizer"
      )
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not a directory; pass a new output directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
    raise FileExistsError(
      f"output directory {out_dir} is not empty; pass an empty or new one, or --force (force=True) to replace it"
    )


def _replace(tmp: str, out_dir: str) -> None:
  """Move the finished `tmp` to `out_dir`; an existing out_dir is set aside first and deleted last."""
  if not os.path.exists(out_dir):
    os.rename(tmp, out_dir)
    return
  old = f"{out_dir}.old-{secrets.token_hex(4)}"
  os.rename(out_dir, old)
  try:
    os.rename(tmp, out_dir)
  except BaseException:
    os.rename(old, out_dir)
    raise
  shutil.rmtree(old)


def _write_json(path: str, data: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, ensure_ascii=False)
    f.write("\n")


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ModelLoadError(f"{path} is not readable JSON ({e}); fix or remove it, then export again") from None
  if not isinstance(data, dict):
    raise ModelLoadError(f"{path} holds a {type(data).__name__}, not a JSON object; fix or remove it")
  return data


def _write_hf_tokenizer(out: str, tokenizer, max_seq_len: int) -> str:
  """The run's tokenizer.json (export_hf copied the files beside it); a bare one (no tokenizer_config.json)
  gets a tokenizer_config.json naming the special tokens jaxllm found, so transformers agrees on them."""
  src = os.path.abspath(tokenizer.path)
  if os.path.basename(src) != "tokenizer.json":  # train.tokenizer may name any file
    shutil.copyfile(src, os.path.join(out, "tokenizer.json"))
  config = os.path.join(out, "tokenizer_config.json")
  if not os.path.exists(config):
    fast = tokenizer.tokenizer
    named = {
      key: fast.id_to_token(i)
      for key, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id))
      if i is not None
    }
    _write_json(
      config,
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
      },
    )
  if hf_chat_template(out):
    return f"tokenizer: {src} and the files beside it, with its chat template"
  _write_json(config, {**_read_json(config), "chat_template": DEFAULT_TEMPLATE})
  return (
    f"tokenizer: {src} and the files beside it; it has no chat template, so jaxllm's default one "
    "(jaxllm.data.chat.DEFAULT_TEMPLATE, which jaxllm serves and fine-tunes it with) is in tokenizer_config.json"
  )


def byte_tokenizer_json() -> str:
  """A `tokenizers` tokenizer.json equivalent to jaxllm's ByteTokenizer: a byte-level BPE with no merges
  whose vocabulary maps each byte's ByteLevel character to the byte's value (ids 0..255 = the UTF-8 bytes
  of the text), and the three specials at 256/257/258 (their names in text encode to them, so a chat
  template's {{ eos_token }} is the eos id). Decoding is UTF-8 with replacement, as jaxllm's."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  tok = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for _, name, _ in BYTE_SPECIALS])
  for _, name, i in BYTE_SPECIALS:
    assert tok.token_to_id(name) == i, (name, tok.token_to_id(name), i)
  return tok.to_str()


def _byte_vocab() -> dict[str, int]:
  """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's), as {character: byte}."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
  return {c: b for b, c in chars.items()}


def _write_byte_tokenizer(out: str, max_seq_len: int) -> str:
  with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
    f.write(byte_tokenizer_json())
  _write_json(
    os.path.join(out, "tokenizer_config.json"),
    {
      "tokenizer_class": "PreTrainedTokenizerFast",
      **{key: name for key, name, _ in BYTE_SPECIALS},
      "model_max_length": max_seq_len,
      "clean_up_tokenization_spaces": False,
      "chat_template": DEFAULT_TEMPLATE,
    },
  )
  return (
    "tokenizer: the run used jaxllm's byte tokenizer, which has no Hugging Face file; wrote an equivalent "
    "byte-level tokenizer.json (ids 0..255 = UTF-8 bytes, 256/257/258 = <|bos|>/<|eos|>/<|pad|>) and jaxllm's "
    "default chat template (jaxllm.data.chat.DEFAULT_TEMPLATE)"
  )


def _write_token_ids(out: str, m) -> dict:
  """generation_config.json with every EOS id (and the tokenizer's bos/pad where the source gave none),
  keeping the source's other generation defaults; config.json gets the same ids where it has none."""
  ids = list(m.eos_ids)
  tok = m.tokenizer
  found = {
    "bos_token_id": tok.bos_id,
    "eos_token_id": ids[0] if len(ids) == 1 else ids or None,
    "pad_token_id": tok.pad_id,
  }
  found = {k: v for k, v in found.items() if v is not None and (not isinstance(v, int) or v < m.cfg.vocab_size)}
  path = os.path.join(out, "generation_config.json")
  gen = _read_json(path) if os.path.exists(path) else {}
  for key, value in found.items():
    if gen.get(key) is None or key == "eos_token_id":  # the full EOS list: the source's ids come first in it
      gen[key] = value
  _write_json(path, gen)
  config_path = os.path.join(out, "config.json")
  config = _read_json(config_path)
  _write_json(config_path, {**config, **{k: v for k, v in gen.items() if k in found and config.get(k) is None}})
  return gen


def parse_size(text: str) -> int:
  """Bytes of "5GB", "500MB", "2GiB" or "123456" (decimal units, as transformers' max_shard_size)."""
  units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
  if not match or match.group(2).upper() not in units:
    raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
  return int(float(match.group(1)) * units[match.group(2).upper()])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m jaxllm.io.export",
    description="Write a jaxllm training run (pretraining, SFT or RL checkpoints) as a Hugging Face model "
    "directory: config.json, safetensors weights, the tokenizer and generation_config.json.",
  )
  p.add_argument("ckpt_dir", help="the run's train.out_dir or its checkpoints folder")
  p.add_argument("out_dir", help="the Hugging Face directory to write (new or empty, unless --force)")
  p.add_argument("--step", type=int, default=None, help="the checkpoint step to export (default: the newest)")
  p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the run's param_dtype)")
  p.add_argument(
    "--architecture", choices=list(FAMILIES), default=None, help="HF architecture (default: inferred from the model)"
  )
  p.add_argument(
    "--max-shard-size",
    type=parse_size,
    default=MAX_SHARD_BYTES,
    metavar="SIZE",
    help="split the weights into files of at most this size, with an index (default: 5GB)",
  )
  p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR (once the new one is complete)")
  args = p.parse_args(argv)
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")  # host work only: do not claim an accelerator
  try:
    export_run(
      args.ckpt_dir,
      args.out_dir,
      args.step,
      dtype=args.dtype,
      architecture=args.architecture,
      force=args.force,
      max_shard_bytes=args.max_shard_size,
    )
  except (ModelLoadError, CheckpointError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
