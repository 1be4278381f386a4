"""Data: tokenizers, corpora and packed, resumable batch iterators. Pure numpy; no jax here.

Shapes: the package legend in jaxllm/__init__.py (B, T); batches are int32 [B, T].
"""

from jaxllm.data.corpus import default_corpus_text, load_texts, split_train_eval, tokenize_documents
from jaxllm.data.loader import PackedBatches, eval_batches
from jaxllm.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
  "ByteTokenizer",
  "HFTokenizer",
  "PackedBatches",
  "default_corpus_text",
  "eval_batches",
  "load_texts",
  "load_tokenizer",
  "split_train_eval",
  "tokenize_documents",
]
