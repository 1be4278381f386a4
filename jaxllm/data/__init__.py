"""Data: tokenizers, chat templates, corpora and SFT rows, and packed, resumable batch iterators (with
their loss masks). Pure numpy (and Jinja for templates); no jax here.

Shapes: the package legend in jaxllm/__init__.py (B, T); batches are int32 [B, T].
"""

from jaxllm.data.chat import DEFAULT_TEMPLATE, ChatFormat
from jaxllm.data.corpus import default_corpus_text, load_texts, split_train_eval, tokenize_documents
from jaxllm.data.loader import PackedBatches, TokenStream, eval_batches
from jaxllm.data.sft import Row, SFTStats, build_stream, load_rows
from jaxllm.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
  "DEFAULT_TEMPLATE",
  "ByteTokenizer",
  "ChatFormat",
  "HFTokenizer",
  "PackedBatches",
  "Row",
  "SFTStats",
  "TokenStream",
  "build_stream",
  "default_corpus_text",
  "eval_batches",
  "load_rows",
  "load_texts",
  "load_tokenizer",
  "split_train_eval",
  "tokenize_documents",
]
