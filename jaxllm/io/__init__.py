"""Hugging Face import/export: config.json, safetensors (single or sharded), tokenizer files."""
from jaxllm.io.hf import export_hf, hf_chat_template, hf_tokenizer_path, load_hf
from jaxllm.io.hf_config import FAMILIES, hf_to_model_config, load_hf_config, model_config_to_hf

__all__ = ["FAMILIES", "export_hf", "hf_chat_template", "hf_to_model_config", "hf_tokenizer_path", "load_hf",
           "load_hf_config", "model_config_to_hf"]
