"""Model files: Hugging Face import/export (config.json, safetensors single or sharded, tokenizer files),
training checkpoints read for inference, and `load_model`, the one loader of either for serving."""

from jaxllm.io.export import export_run
from jaxllm.io.hf import export_hf, hf_chat_template, hf_tokenizer_path, load_hf
from jaxllm.io.hf_config import FAMILIES, hf_to_model_config, load_hf_config, model_config_to_hf
from jaxllm.io.load import LoadedModel, ModelLoadError, eos_ids, generation_defaults, load_model

__all__ = [
  "FAMILIES",
  "LoadedModel",
  "ModelLoadError",
  "eos_ids",
  "export_hf",
  "export_run",
  "generation_defaults",
  "hf_chat_template",
  "hf_to_model_config",
  "hf_tokenizer_path",
  "load_hf",
  "load_hf_config",
  "load_model",
  "model_config_to_hf",
]
