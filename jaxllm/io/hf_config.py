"""Hugging Face `config.json` <-> jaxllm ModelConfig for six decoder families.

Supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM,
Qwen2MoeForCausalLM, Qwen3MoeForCausalLM. Both config spellings are read:
  - RoPE: top-level `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters`
    (transformers 5.x, which holds `rope_theta` and the scaling keys together);
  - experts: `num_local_experts` (Mixtral, and Qwen3-MoE under transformers 5) or `num_experts`;
  - `head_dim` missing or null means hidden_size // num_attention_heads;
  - `torch_dtype` (4.x) or `dtype` (5.x).
A config that uses a feature the jaxllm model does not have (sliding-window layers, dense layers
between MoE layers, biases on o_proj/MLP, another RoPE type, another activation) is rejected with
the key that causes it, rather than loaded into a model that would compute something else.
Export writes the 4.x spelling, which transformers 5 also reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from jaxllm.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Family:
  architecture: str  # config.json "architectures"[0]
  model_type: str  # config.json "model_type"
  moe: str  # "" dense, "mixtral" (block_sparse_moe.w1/w2/w3) or "qwen" (mlp.experts.*_proj)
  qkv_bias: bool  # q/k/v projections carry biases (Qwen2; Qwen2-MoE by its `qkv_bias` key)
  qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
  shared_expert: bool  # gated shared expert (Qwen2-MoE)
  rope_theta: float  # transformers' default when the file omits it
  norm_eps: float  # transformers' default rms_norm_eps
  renormalize: bool | None  # fixed top-k renormalisation (Mixtral), or None: read `norm_topk_prob`


FAMILIES = {
  f.architecture: f
  for f in [
    Family("LlamaForCausalLM", "llama", "", False, False, False, 10000.0, 1e-6, None),
    Family("Qwen2ForCausalLM", "qwen2", "", True, False, False, 10000.0, 1e-6, None),
    Family("Qwen3ForCausalLM", "qwen3", "", False, True, False, 10000.0, 1e-6, None),
    Family("MixtralForCausalLM", "mixtral", "mixtral", False, False, False, 1e6, 1e-5, True),
    Family("Qwen2MoeForCausalLM", "qwen2_moe", "qwen", True, False, True, 10000.0, 1e-6, None),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", "qwen", False, True, False, 10000.0, 1e-6, None),
  ]
}


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ValueError(
      f"{path} does not exist; a Hugging Face model directory needs config.json (and *.safetensors weights)"
    ) from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def family_of(hf: dict, where: str = "config.json") -> Family:
  archs = hf.get("architectures") or []
  arch = archs[0] if archs else None
  if arch not in FAMILIES:
    by_type = [f for f in FAMILIES.values() if f.model_type == hf.get("model_type")]
    if arch is None and len(by_type) == 1:
      return by_type[0]
    raise ValueError(
      f"{where}: unsupported architecture {arch or hf.get('model_type')!r}; jaxllm imports {', '.join(FAMILIES)}"
    )
  return FAMILIES[arch]


def _rope(hf: dict, fam: Family, where: str) -> dict:
  """RoPE fields of ModelConfig from either spelling."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", fam.rope_theta))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(
      f"{where}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported (jaxllm rotates the whole head)"
    )
  out = {"rope_theta": float(theta)}
  if kind == "llama3":
    out.update(
      rope_scaling="llama3",
      rope_factor=float(merged["factor"]),
      rope_low_freq_factor=float(merged["low_freq_factor"]),
      rope_high_freq_factor=float(merged["high_freq_factor"]),
      rope_original_max_pos=int(merged["original_max_position_embeddings"]),
    )
  elif kind != "default":
    raise ValueError(f"{where}: RoPE type {kind!r} is not supported; jaxllm implements 'default' and 'llama3' scaling")
  return out


def _check_supported(hf: dict, fam: Family, where: str) -> None:
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{where}: hidden_act={act!r}; jaxllm's MLP is SwiGLU (silu)")
  for key in ("attention_bias", "mlp_bias"):
    if fam.architecture != "Qwen2ForCausalLM" and hf.get(key):
      raise ValueError(
        f"{where}: {key}=true adds biases jaxllm does not have (o_proj/MLP); "
        "only Qwen2-style q/k/v biases are supported"
      )
  types = hf.get("layer_types") or []
  if hf.get("use_sliding_window") or any(t != "full_attention" for t in types):
    raise ValueError(
      f"{where}: sliding-window attention layers (use_sliding_window / layer_types) are "
      "not supported; jaxllm attends over the full causal context"
    )
  window = hf.get("sliding_window")
  if fam.architecture == "MixtralForCausalLM" and window and window < hf.get("max_position_embeddings", 0):
    raise ValueError(
      f"{where}: sliding_window={window} < max_position_embeddings; jaxllm has no "
      "sliding-window attention (set sliding_window to null to attend to everything)"
    )
  if fam.moe == "qwen":
    step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    if step != 1 or dense:
      raise ValueError(
        f"{where}: decoder_sparse_step={step}, mlp_only_layers={dense} mix dense and MoE "
        "layers; jaxllm's MoE models are MoE in every layer (needs step 1, no mlp_only_layers)"
      )


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}  # fp16 -> fp32 is lossless


def hf_to_model_config(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig from a parsed config.json; `overrides` replace any ModelConfig field."""
  fam = family_of(hf, where)
  _check_supported(hf, fam, where)
  try:
    D, N = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kw = dict(
      vocab_size=int(hf["vocab_size"]),
      d_model=D,
      n_layers=int(hf["num_hidden_layers"]),
      n_heads=N,
      n_kv_heads=int(hf.get("num_key_value_heads") or N),
      head_dim=int(hf.get("head_dim") or 0),
      d_ff=int(hf["intermediate_size"]),
    )
  except KeyError as e:
    raise ValueError(f"{where}: required key {e.args[0]!r} is missing") from None
  if kw["head_dim"] * N == D:
    kw["head_dim"] = 0  # canonical: 0 means d_model // n_heads (files write it either way, or null)
  kw.update(_rope(hf, fam, where))
  kw["max_seq_len"] = int(hf.get("max_position_embeddings", 2048))
  kw["norm_eps"] = float(hf.get("rms_norm_eps", fam.norm_eps))
  kw["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False))
  kw["qkv_bias"] = bool(hf.get("qkv_bias", True)) if fam.qkv_bias else False
  kw["qk_norm"] = fam.qk_norm
  if fam.moe:
    kw["n_experts"] = int(hf.get("num_local_experts") or hf.get("num_experts") or 0)
    if not kw["n_experts"]:
      raise ValueError(f"{where}: a {fam.architecture} config needs num_local_experts or num_experts")
    kw["n_experts_per_tok"] = int(hf.get("num_experts_per_tok", 2))
    kw["moe_d_ff"] = int(hf["moe_intermediate_size"]) if fam.moe == "qwen" else kw["d_ff"]
    # Mixtral always renormalises the top-k softmax; Qwen-MoE does when norm_topk_prob (default false).
    kw["moe_renormalize"] = fam.renormalize if fam.renormalize is not None else bool(hf.get("norm_topk_prob", False))
    if "router_aux_loss_coef" in hf:
      kw["aux_loss_coef"] = float(hf["router_aux_loss_coef"])
    if fam.shared_expert:
      kw["shared_expert_d_ff"] = int(hf["shared_expert_intermediate_size"])
      kw["shared_expert_gate"] = True
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  dtype = dtype.removeprefix("torch.") if isinstance(dtype, str) else "float32"
  kw["dtype"] = kw["param_dtype"] = _DTYPES.get(dtype, "float32")
  kw["name"] = hf.get("_name_or_path") or fam.model_type
  kw.update(overrides)
  try:
    return ModelConfig(**kw)
  except (ConfigError, TypeError) as e:
    raise ValueError(f"{where}: cannot build a jaxllm ModelConfig: {e}") from None


def load_hf_config(model_dir: str, **overrides) -> ModelConfig:
  """ModelConfig of a Hugging Face model directory (its config.json)."""
  path = os.path.join(model_dir, "config.json")
  return hf_to_model_config(read_json(path), where=path, **overrides)


def infer_architecture(cfg: ModelConfig) -> str:
  """The HF family a jaxllm config most naturally exports as."""
  if cfg.is_moe:
    if cfg.shared_expert_d_ff:
      return "Qwen2MoeForCausalLM"
    return "Qwen3MoeForCausalLM" if cfg.qk_norm else "MixtralForCausalLM"
  if cfg.qkv_bias:
    return "Qwen2ForCausalLM"
  return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def model_config_to_hf(cfg: ModelConfig, architecture: str | None = None) -> dict:
  """config.json contents for `cfg` as `architecture` (inferred when None); errors if the family
  cannot express the config."""
  arch = architecture or infer_architecture(cfg)
  if arch not in FAMILIES:
    raise ValueError(f"unsupported architecture {arch!r}; jaxllm exports {', '.join(FAMILIES)}")
  fam = FAMILIES[arch]
  problems = []
  if bool(fam.moe) != cfg.is_moe:
    problems.append(
      f"n_experts={cfg.n_experts} ({'MoE' if cfg.is_moe else 'dense'}) but {arch} is {'MoE' if fam.moe else 'dense'}"
    )
  if cfg.qk_norm != fam.qk_norm:
    problems.append(f"qk_norm={cfg.qk_norm} but {arch} has qk_norm={fam.qk_norm}")
  if cfg.qkv_bias and not fam.qkv_bias:
    problems.append(f"qkv_bias=True but {arch} has no q/k/v biases")
  if not cfg.qkv_bias and arch == "Qwen2ForCausalLM":
    problems.append("Qwen2ForCausalLM always has q/k/v biases but qkv_bias=False")
  if cfg.is_moe and fam.renormalize is not None and cfg.moe_renormalize != fam.renormalize:
    problems.append(f"moe_renormalize={cfg.moe_renormalize} but {arch} always renormalises top-k")
  if cfg.is_moe and bool(cfg.shared_expert_d_ff) != fam.shared_expert:
    problems.append(
      f"shared_expert_d_ff={cfg.shared_expert_d_ff} but {arch} "
      f"{'always has' if fam.shared_expert else 'has no'} shared expert"
    )
  if fam.shared_expert and not cfg.shared_expert_gate:
    problems.append(f"{arch}'s shared expert is always sigmoid-gated but shared_expert_gate=False")
  if problems:
    raise ValueError(f"cannot export this jaxllm model as {arch}: " + "; ".join(problems))
  hf = {
    "architectures": [arch],
    "model_type": fam.model_type,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.resolved_head_dim,
    "intermediate_size": cfg.d_ff,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_seq_len,
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    "tie_word_embeddings": cfg.tie_embeddings,
    "torch_dtype": cfg.param_dtype,
    "attention_dropout": 0.0,
    "use_cache": True,
  }
  if cfg.rope_scaling == "llama3":
    hf["rope_scaling"] = {
      "rope_type": "llama3",
      "factor": cfg.rope_factor,
      "low_freq_factor": cfg.rope_low_freq_factor,
      "high_freq_factor": cfg.rope_high_freq_factor,
      "original_max_position_embeddings": cfg.rope_original_max_pos,
    }
  if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
    hf["attention_bias"] = False
  if arch == "LlamaForCausalLM":
    hf["mlp_bias"] = False
  if fam.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"):
    hf["use_sliding_window"] = False
    hf["sliding_window"] = None
  if cfg.is_moe:
    hf["num_experts_per_tok"] = cfg.n_experts_per_tok
    hf["router_aux_loss_coef"] = cfg.aux_loss_coef
    if fam.moe == "mixtral":
      # Mixtral's intermediate_size is the expert width (jaxllm's d_ff is unused in MoE models).
      hf.update(num_local_experts=cfg.n_experts, intermediate_size=cfg.resolved_moe_d_ff)
    else:
      hf.update(
        num_experts=cfg.n_experts,
        moe_intermediate_size=cfg.resolved_moe_d_ff,
        norm_topk_prob=cfg.moe_renormalize,
        decoder_sparse_step=1,
        mlp_only_layers=[],
      )
    if fam.shared_expert:
      hf["shared_expert_intermediate_size"] = cfg.shared_expert_d_ff
      hf["qkv_bias"] = cfg.qkv_bias  # transformers 5 key; 4.x always has the biases
  return hf
