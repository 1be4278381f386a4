"""Structured output: grammars compiled by llguidance, one matcher per request, token bitmasks.

A request's SamplingParams.grammar is (kind, spec):
  "json_object"  any JSON object (spec ignored: "")  OpenAI response_format {"type": "json_object"}
  "json_schema"  a JSON schema (spec: its JSON text) OpenAI {"type": "json_schema"}, vLLM guided_json
  "regex"        the whole output matches the regex   vLLM guided_regex, SGLang regex
  "ebnf"         a GBNF grammar (llama.cpp's, as vLLM and SGLang accept it; Lark passes through too)
  "lark"         llguidance's Lark dialect (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md)

The work splits as in vLLM's and SGLang's grammar backends:
  `grammar_text(kind, spec)`  the tokenizer-independent grammar llguidance reads, checked; an LRU cache.
  `GrammarCompiler`           one per tokenizer: the LLTokenizer (built once from the vocabulary) and an
                              LRU of compiled matchers keyed by (kind, spec); `matcher` deep-copies one
                              (cheap: the lexer and parser tables are shared).
  `Matcher`                   a request's parser state: consumes its sampled tokens, and fills the
                              bitmask of its next token, one bit per model token (1 = allowed), as
                              llguidance.numpy lays it out: [ceil(V/32)] int32, token t is bit t % 32 of
                              word t // 32. The sampler applies it on device (jaxllm.serve.sampling).

End of output: the request's stop ids (EOS included unless ignore_eos) are allowed only while the
grammar accepts what was generated, and the request finishes ("stop") the moment the grammar is
complete (nothing but the end may follow), without spending a step on an EOS.

JSON is generated compact (no whitespace between tokens, as json.dumps(separators=(",", ":")) writes
it): the output stays bounded whatever the weights. A schema's "x-guidance" object sets llguidance's
JSON options otherwise (e.g. {"whitespace_flexible": true}).
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict

import llguidance as llg
import llguidance.numpy as llnp
import numpy as np

KINDS = ("json_object", "json_schema", "regex", "ebnf", "lark")
MASK_BITS = 32  # tokens per int32 word of a bitmask
JSON_DEFAULTS = {"whitespace_flexible": False}  # compact JSON (module doc); a schema's x-guidance overrides
COMPILED_CACHE = 256  # compiled grammars kept per tokenizer (LRU)
PARALLEL_FILL_VOCAB = 32768  # below this many tokens a batch's masks are filled in turn (threads cost more)
_ANY_OBJECT = '{"type": "object"}'


def mask_words(vocab_size: int) -> int:
  """int32 words of one row's bitmask."""
  return -(-vocab_size // MASK_BITS)


def normalize(grammar) -> tuple | None:
  """A grammar as SamplingParams keeps it: (kind, spec text), hashable. A json_schema spec may be
  given as a dict (it becomes its JSON text; key order kept: properties are generated in it).
  ValueError (naming `grammar`) for a malformed pair; the grammar itself is checked by grammar_text."""
  if grammar is None:
    return None
  if not isinstance(grammar, (tuple, list)) or len(grammar) != 2 or grammar[0] not in KINDS:
    raise ValueError(f"invalid grammar={grammar!r}: grammar must be (kind, spec) with kind one of {', '.join(KINDS)}")
  kind, spec = grammar
  if kind == "json_schema" and isinstance(spec, (dict, bool)):
    spec = json.dumps(spec)
  if kind == "json_object":
    spec = "" if spec is None else spec
  if not isinstance(spec, str) or (kind != "json_object" and not spec):
    raise ValueError(f"invalid grammar={grammar!r}: the spec of a {kind} grammar must be a non-empty string")
  return kind, spec


@functools.lru_cache(maxsize=1024)
def grammar_text(kind: str, spec: str) -> str:
  """(kind, spec) -> the llguidance grammar, checked (without a tokenizer). ValueError says what is
  wrong with it, in llguidance's words (a schema keyword it does not support, a regex that does not
  parse, a grammar rule never defined, ...)."""
  try:
    if kind in ("json_object", "json_schema"):
      text = llg.LLMatcher.grammar_from_json_schema(_ANY_OBJECT if kind == "json_object" else spec, JSON_DEFAULTS)
    elif kind == "regex":
      text = llg.LLMatcher.grammar_from_regex(spec)
    elif kind == "ebnf":
      text = llg.grammar_from("gbnf", spec)  # GBNF -> Lark (Lark itself passes through)
    elif kind == "lark":
      text = llg.LLMatcher.grammar_from_lark(spec)
    else:
      raise ValueError(f"unknown grammar kind {kind!r}; use one of {', '.join(KINDS)}")
  except ValueError as e:  # not JSON, or a GBNF grammar that does not convert
    raise ValueError(f"invalid {kind} grammar: {e}") from None
  is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text)
  if is_error:
    raise ValueError(f"invalid {kind} grammar: {messages[0]}")
  return text


def ll_tokenizer(tokenizer) -> llg.LLTokenizer:
  """The LLTokenizer of a jaxllm tokenizer (jaxllm.data): a Hugging Face one from its tokenizer.json
  (as llguidance.hf does), the byte tokenizer from its token bytes (ids 0..255 = the bytes, then
  the specials). About a second for a 150k vocabulary: build it once per tokenizer."""
  eos = getattr(tokenizer, "eos_id", None)
  backend = getattr(tokenizer, "tokenizer", None)
  if backend is not None and hasattr(backend, "to_str"):  # jaxllm.data.HFTokenizer
    return llg.LLTokenizer(backend.to_str(), eos_token=eos)
  from jaxllm.data.tokenizer import ByteTokenizer

  if isinstance(tokenizer, ByteTokenizer):
    return llg.LLTokenizer(llg.TokenizerWrapper(_ByteVocab(tokenizer)))
  raise ValueError(
    f"structured output needs the vocabulary's token bytes; {type(tokenizer).__name__} is neither "
    "jaxllm's byte tokenizer nor a Hugging Face tokenizer.json"
  )


class _ByteVocab:
  """The byte tokenizer as llguidance.TokenizerWrapper reads a tokenizer: token bytes, specials, encode."""

  def __init__(self, tok):
    self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
    specials = {tok.bos_id: b"<|bos|>", tok.eos_id: b"<|eos|>", tok.pad_id: b"<|pad|>"}
    self.tokens = [bytes([i]) for i in range(256)] + [specials[i] for i in range(256, tok.vocab_size)]
    self.special_token_ids = sorted(specials)

  def __call__(self, text: bytes) -> list[int]:
    return list(text)


class GrammarCompiler:
  """Compiled grammars of one tokenizer for a model of `vocab_size` tokens (bitmask width), shared by
  every request; thread-safe (the server compiles on the request's thread, at submission)."""

  def __init__(self, tokenizer, vocab_size: int, cache_size: int = COMPILED_CACHE):
    self.ll = ll_tokenizer(tokenizer)
    if self.ll.vocab_size > vocab_size:
      raise ValueError(
        f"the tokenizer has {self.ll.vocab_size} tokens but the model only {vocab_size}: they do not belong together"
      )
    self.vocab_size, self.words = vocab_size, mask_words(vocab_size)
    self.ll_words = mask_words(self.ll.vocab_size)
    # llguidance's bits past its own vocabulary are not ours to trust: keep only real token ids.
    self._last_word = np.int32(-1 if self.ll.vocab_size % MASK_BITS == 0 else (1 << self.ll.vocab_size % MASK_BITS) - 1)
    self.eos = list(self.ll.eos_tokens)
    self.cache_size = cache_size
    self._cache: OrderedDict = OrderedDict()  # (kind, spec) -> LLMatcher never advanced (a template)
    self._lock = threading.Lock()
    self._executor = llg.LLExecutor()

  def compile(self, grammar: tuple) -> llg.LLMatcher:
    """The compiled matcher template of (kind, spec), from the cache or built now. ValueError for a
    grammar llguidance rejects (it names the problem)."""
    key = normalize(grammar)
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        return self._cache[key]
    matcher = llg.LLMatcher(self.ll, grammar_text(*key), log_level=0)  # drops the GIL while it builds
    if matcher.is_error():
      raise ValueError(f"invalid {key[0]} grammar: {matcher.get_error()}")
    with self._lock:
      self._cache[key] = matcher
      while len(self._cache) > self.cache_size:
        self._cache.popitem(last=False)
    return matcher

  def matcher(self, grammar: tuple, stop_ids=()) -> Matcher:
    """A fresh matcher of one request; stop_ids: its stop tokens (allowed while the grammar accepts)."""
    return Matcher(self.compile(grammar).deep_copy(), self, stop_ids)

  def fill(self, matchers: list[Matcher]) -> None:
    """Compute the next-token bitmask of each matcher (llguidance's parallel fill for a batch)."""
    if not matchers:
      return
    raw = np.zeros((len(matchers), self.ll_words), np.int32)
    if len(matchers) == 1 or self.ll.vocab_size < PARALLEL_FILL_VOCAB:
      for i, m in enumerate(matchers):
        llnp.fill_next_token_bitmask(m.m, raw, i)
    else:
      llnp.fill_next_token_bitmask_par(self._executor, [(m.m, i) for i, m in enumerate(matchers)], raw)
    for i, m in enumerate(matchers):
      m._set_mask(raw[i])


def _bit(t: int) -> np.int32:
  """Token t's bit in its int32 word."""
  return np.uint32(1 << t % MASK_BITS).view(np.int32)


class Matcher:
  """One request's grammar state: feed it the request's tokens, read the mask of its next one."""

  def __init__(self, m: llg.LLMatcher, compiler: GrammarCompiler, stop_ids=()):
    self.m, self.compiler = m, compiler
    self.stop_ids = [t for t in stop_ids if 0 <= t < compiler.vocab_size]
    self.consumed = 0  # tokens of the request's output fed so far
    self.mask: np.ndarray | None = None  # [words] int32 bitmask of the next token; None = to compute

  def consume(self, tokens) -> bool:
    """Advance over generated tokens; False if one of them breaks the grammar (then is_error)."""
    self.mask = None
    self.consumed += len(tokens)
    return self.m.consume_tokens([int(t) for t in tokens])

  @property
  def done(self) -> bool:
    """The grammar is complete: nothing but the end of the output may follow."""
    return self.m.is_stopped()

  @property
  def error(self) -> str:
    return self.m.get_error() if self.m.is_error() else ""

  def next_mask(self) -> np.ndarray:
    if self.mask is None:
      self.compiler.fill([self])
    return self.mask

  def _set_mask(self, raw: np.ndarray) -> None:
    c = self.compiler
    mask = np.zeros(c.words, np.int32)
    mask[: c.ll_words] = raw
    mask[c.ll_words - 1] &= c._last_word
    # The end is the request's stop ids, allowed while what was generated is a complete match
    # (llguidance's own EOS bit is replaced: ignore_eos rows have EOS outside their stop ids).
    for t in c.eos:
      mask[t // MASK_BITS] &= ~_bit(t)
    if self.m.is_accepting():
      for t in self.stop_ids:
        mask[t // MASK_BITS] |= _bit(t)
    self.mask = mask
