"""The shared Flax NNX decoder used by training, serving and RL."""

from jaxllm.model.cache import KVCache
from jaxllm.model.transformer import Output, Transformer, aux_loss, block_forward

__all__ = ["KVCache", "Output", "Transformer", "aux_loss", "block_forward"]
