"""Structured output's cost: output tokens/s with and without a grammar, side by side in one run.

One random Llama (fp32) and one tokenizer; a batch of B requests decoded together, every row
producing exactly --new tokens (so both sides do the same work): without a grammar (ignore_eos),
and with a JSON schema (an array of at least 50 objects with strings, integers and enums, longer
than --new tokens, so no row finishes early) or a regex. Each engine setting is measured twice:
  default            serve's defaults: multi-step decode (decode_steps=8) and overlap. A batch with
                     a grammar row decodes one step per call (the mask of a row's next token needs
                     its last token on the host), overlapped: the forward of step n+1 runs while the
                     host computes the masks from step n's tokens. This is the cost a user sees;
  decode_steps=1     one step per call with overlap for both: the cost of the masks themselves;
  no overlap         one step per call, no overlap: the masks' host time shows in full.
Greedy by default: a sampled step sorts the whole vocabulary (the top-p filter), which dominates the
step at a 32k vocabulary on a CPU and runs faster on masked logits (mostly -inf), flattering the
grammar side (--temperature 1 shows it). No detokenizer runs (the text of random tokens, often
partial UTF-8, costs far more to build than that of JSON, which would flatter the grammar side too).
Columns: output tokens/s (B x new / wall of Engine.generate, prefill included; best of --reps after
a warm-up call, the variants taking turns), the ratio to the same setting without a grammar, the
host time spent on the grammar (filling masks + consuming tokens) per generated token, and that time
as a share of the time per token without a grammar (what the masks cost, steadier than the ratio on
a busy machine).

The tokenizer: by default a byte-level BPE trained here on the Python standard library's sources
(--bpe-vocab ids; large vocabularies make the mask costlier), or --tokenizer byte / a tokenizer.json.

  python benchmarks/bench_structured.py                       # batch 8, 128 new tokens, a 32k BPE
  python benchmarks/bench_structured.py --tokenizer byte --new 64
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from jaxllm.config import ModelConfig, ServeConfig  # noqa: E402
from jaxllm.data import load_tokenizer  # noqa: E402
from jaxllm.model.params import init_params  # noqa: E402
from jaxllm.serve import Engine  # noqa: E402
from jaxllm.serve import grammar as grammar_mod  # noqa: E402
from jaxllm.serve.sampling import SamplingParams  # noqa: E402

ITEM = {
  "type": "object",
  "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
  },
  "required": ["name", "age", "role"],
  "additionalProperties": False,
}
GRAMMARS = {
  "json": ("json_schema", {"type": "array", "items": ITEM, "minItems": 50}),
  "regex": ("regex", r"([a-z]+ ){200,}"),
}


def train_bpe(vocab: int, out_dir: str, max_bytes: int = 4_000_000) -> str:
  """A byte-level BPE tokenizer.json of `vocab` ids trained on the standard library's sources."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  files, size = [], 0
  for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
    files.append(path)
    size += os.path.getsize(path)
    if size > max_bytes:
      break
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train(files, trainer)
  path = os.path.join(out_dir, "tokenizer.json")
  tok.save(path)
  return path


class HostTimer:
  """Time spent in the engine's grammar work (mask fills and token consumption)."""

  def __init__(self):
    self.seconds = 0.0

  def wrap(self, obj, name):
    fn = getattr(obj, name)

    def timed(*a, **kw):
      t0 = time.perf_counter()
      try:
        return fn(*a, **kw)
      finally:
        self.seconds += time.perf_counter() - t0

    setattr(obj, name, timed)


def measure(engine, prompts, sps: dict, reps: int, timer: HostTimer) -> dict:
  """name -> (best wall time of engine.generate over `reps` calls after a warm-up call, its output
  tokens, the grammar's host seconds in that call). The variants take turns, so a burst of load on
  the shared machine hits them alike."""
  for sp in sps.values():
    engine.generate(prompts, sp)
  best = {name: (float("inf"), 0, 0.0) for name in sps}
  for _ in range(reps):
    for name, sp in sps.items():
      timer.seconds = 0.0
      t0 = time.perf_counter()
      out = engine.generate(prompts, sp)
      wall = time.perf_counter() - t0
      if wall < best[name][0]:
        best[name] = (wall, sum(len(r.output) for r in out), timer.seconds)
  return best


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new", type=int, default=128, help="output tokens per request")
  p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--tokenizer", default="", help="'byte' or a tokenizer.json; default: a BPE trained here")
  p.add_argument("--bpe-vocab", type=int, default=32000)
  p.add_argument("--grammars", default="json,regex")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (module doc)")
  args = p.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    spec = args.tokenizer or train_bpe(args.bpe_vocab, tmp)
    tok = load_tokenizer(spec)
  vocab = -(-tok.vocab_size // 128) * 128
  cfg = ModelConfig(
    name="bench",
    n_layers=args.layers,
    d_model=args.d_model,
    n_heads=4,
    n_kv_heads=4,
    d_ff=4 * args.d_model,
    vocab_size=vocab,
    max_seq_len=args.prompt + args.new + 16,
  )
  params = jax.jit(lambda: init_params(cfg, 0))()
  B = args.batch
  words = "the quick brown fox jumps over the lazy dog and keeps running through the field " * 8
  prompts = [tok.encode(f"{i}: {words}")[: args.prompt] for i in range(B)]
  print(
    f"model: {args.layers} layers, d={args.d_model}, vocab {vocab} ({type(tok).__name__}, {tok.vocab_size} ids), "
    f"fp32; batch {B}, prompt {args.prompt}, {args.new} new tokens, temperature {args.temperature:g}; "
    f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs",
    flush=True,
  )
  base = ServeConfig(max_running=B, num_pages=1024, page_size=16, radix=False, min_seqs=B)
  settings = {
    "default": base,
    "decode_steps=1": dataclasses.replace(base, decode_steps=1),
    "no overlap": dataclasses.replace(base, decode_steps=1, overlap=False),
  }
  rows, timer = [], HostTimer()
  timer.wrap(grammar_mod.Matcher, "consume")
  for name, serve in settings.items():
    engine = Engine(cfg, params, serve, tokenizer=tok)
    engine.detokenize = None  # no text: random tokens' (often partial UTF-8) would cost the "off" side more
    timer.wrap(engine.grammars, "fill")
    sp = SamplingParams(max_tokens=args.new, temperature=args.temperature, seed=0, ignore_eos=True)
    sps = {"off": sp} | {g: dataclasses.replace(sp, grammar=GRAMMARS[g]) for g in args.grammars.split(",")}
    best = measure(engine, prompts, sps, args.reps, timer)
    off = best["off"][1] / best["off"][0]
    for g, (wall, n, host) in best.items():
      assert n == B * args.new, f"{g}: {n} tokens, expected {B * args.new} (a row finished early)"
      rows.append((name, g, n / wall, n / wall / off, 1e3 * host / n, host / n * off))
    print(f"  {name}: done", flush=True)

  print(
    f"\n{'engine setting':<16} {'grammar':<8} {'out tok/s':>10} {'vs off':>7} {'grammar host ms/token':>22} "
    f"{'of the off time':>16}"
  )
  for name, g, rate, ratio, host, share in rows:
    print(f"{name:<16} {g:<8} {rate:>10.1f} {ratio:>7.2f} {host:>22.3f} {share:>15.1%}")


if __name__ == "__main__":
  main()
