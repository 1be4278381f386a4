"""Serving over HTTP, radix cache off vs on, side by side in one process.

A shared-prefix workload (G groups of K requests; each group shares a long system prompt, each
request adds its own question) is sent by C concurrent streaming clients to `/v1/completions` of a
live server on loopback (the real FastAPI app on uvicorn, the real engine thread). Per setting it
prints requests/s, output tokens/s, TTFT and inter-token latency p50/p90 (measured by the client at
each streamed chunk), and the share of prompt tokens served from the cache against the ideal (every
request but the first of its group reuses the system prompt's whole pages).

  python benchmarks/bench_http.py                       # tiny random model, byte tokenizer
  python benchmarks/bench_http.py --groups 8 --per-group 8 --system-len 512 --concurrency 16   # lighter sharing

--itl: streaming without bursts instead. C streaming clients decode at serve.decode_steps=8, with
serve.stream_multistep on (k tokens per device call, handed over at once: bursts) and off (one step
per call while a stream waits); client ITL p50/p90 per token (a chunk of k tokens: k - 1 gaps of 0)
against the engine's time per token step in the same run (median over requests of their decode time
on the engine thread / tokens), so the ratio is what delivery adds, whatever the machine's load.

  python benchmarks/bench_http.py --itl --concurrency 4 --max-tokens 64
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from jaxllm.buckets import pow2_bucket  # noqa: E402
from jaxllm.config import MODEL_PRESETS, ServeConfig  # noqa: E402
from jaxllm.data import load_tokenizer  # noqa: E402
from jaxllm.model.params import init_params  # noqa: E402
from jaxllm.serve import Engine  # noqa: E402
from jaxllm.serve.http import create_app  # noqa: E402
from jaxllm.serve.service import EngineService  # noqa: E402


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """The app on uvicorn in a background thread, stopped on exit."""

  def __init__(self, app, port: int):
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self):
    self.thread.start()
    while not self.server.started:
      time.sleep(0.02)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join()


def workload(groups: int, per_group: int, system_len: int, question_len: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  letters = "abcdefghijklmnopqrstuvwxyz     "
  text = lambda n: "".join(rng.choice(letters) for _ in range(n))
  systems = [f"[system {g}] " + text(system_len) for g in range(groups)]
  prompts = [s + f" [q{i}] " + text(question_len) for s in systems for i in range(per_group)]
  rng.shuffle(prompts)
  return prompts


async def one(client, url, prompt, max_tokens, out, per_token=False):
  """One streamed request; the client's time of each chunk with text, or with per_token of each token
  (a chunk of k tokens counts k times: its tokens arrived together)."""
  t0 = time.perf_counter()
  times, usage = [], None
  body = {
    "model": "bench",
    "prompt": prompt,
    "max_tokens": max_tokens,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
    "return_token_ids": per_token,
  }
  async with client.stream("POST", url + "/v1/completions", json=body) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if chunk.get("usage"):
        usage = chunk["usage"]
      if per_token and chunk.get("choices"):
        times += [time.perf_counter()] * len(chunk["choices"][0].get("token_ids", ()))
      elif chunk.get("choices") and chunk["choices"][0].get("text"):
        times.append(time.perf_counter())
  out.append(
    {
      "ttft": times[0] - t0 if times else float("nan"),
      "itl": [b - a for a, b in zip(times, times[1:])],
      "e2e": time.perf_counter() - t0,
      "usage": usage,
    }
  )


async def drive(url, prompts, max_tokens, concurrency, per_token=False):
  out, queue = [], list(prompts)
  async with httpx.AsyncClient(timeout=600) as client:

    async def worker():
      while queue:
        await one(client, url, queue.pop(), max_tokens, out, per_token)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, time.perf_counter() - t0


def pct(xs, q):
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def itl_main(a, cfg, params, tok):
  prompts = [p[:64] for p in workload(1, a.concurrency * 4, 48, 16, a.seed)]
  print(f"{a.concurrency} streaming clients, {a.max_tokens} tokens each, serve.decode_steps=8")
  print(
    f"{'stream_multistep':>16} {'out tok/s':>10} {'tok/chunk':>9} {'step':>8} {'ITL p50':>8} {'p90':>8} "
    f"{'p50 / step':>10} {'p90 / step':>10}"
  )
  for bursts in (True, False):
    serve = ServeConfig(max_running=16, min_seqs=4, chunk_size=64, decode_steps=8, stream_multistep=bursts)
    engine = Engine(cfg, params, serve, detokenize=tok.decode)
    engine.warmup()
    service = EngineService(engine, max_waiting=1024)
    per_token = []  # engine side: each request's decode time / its tokens after the first
    service.add_finish_hook(lambda req, t: per_token.append(sum(t.itl) / len(t.itl)) if t.itl else None)
    service.start()
    port = free_port()
    with Server(create_app(service, tok, "bench", serve, None), port):
      url = f"http://127.0.0.1:{port}"
      asyncio.run(drive(url, prompts[: a.concurrency], a.max_tokens, a.concurrency))  # warm up
      per_token.clear()
      out, wall = asyncio.run(drive(url, prompts, a.max_tokens, a.concurrency, per_token=True))
    service.close()
    itl = [x for o in out for x in o["itl"]]
    completion = sum(o["usage"]["completion_tokens"] for o in out)
    step, p50, p90 = pct(per_token, 0.5), pct(itl, 0.5), pct(itl, 0.9)
    chunks = sum(1 + sum(x > 0 for x in o["itl"]) for o in out)
    print(
      f"{str(bursts):>16} {completion / wall:>10.1f} {completion / chunks:>9.2f} "
      f"{1e3 * step:>6.2f}ms {1e3 * p50:>6.2f}ms {1e3 * p90:>6.2f}ms "
      f"{p50 / step:>10.2f} {p90 / step:>10.2f}"
    )


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="tiny")
  ap.add_argument("--groups", type=int, default=4)
  ap.add_argument("--per-group", type=int, default=16)
  ap.add_argument("--system-len", type=int, default=1536, help="characters (= byte tokens) of each system prompt")
  ap.add_argument("--question-len", type=int, default=16)
  ap.add_argument("--max-tokens", type=int, default=8)
  ap.add_argument("--concurrency", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--itl", action="store_true", help="streaming inter-token latency with and without bursts")
  a = ap.parse_args()
  tok = load_tokenizer("byte")
  longest = a.system_len + a.question_len + 32 + a.max_tokens
  cfg = dataclasses.replace(MODEL_PRESETS[a.model], max_seq_len=pow2_bucket(longest))
  params = init_params(cfg, 0)
  if a.itl:
    return itl_main(a, cfg, params, tok)
  prompts = workload(a.groups, a.per_group, a.system_len, a.question_len, a.seed)
  print(
    f"model {a.model} (random weights), {len(prompts)} requests = {a.groups} groups x {a.per_group}, "
    f"system {a.system_len} + question ~{a.question_len + 10} tokens, {a.max_tokens} new tokens, "
    f"{a.concurrency} concurrent streaming clients"
  )
  rows = []
  for radix in (False, True):
    serve = ServeConfig(radix=radix, num_pages=4096, max_running=16, chunk_size=512)
    engine = Engine(cfg, params, serve, detokenize=tok.decode)
    service = EngineService(engine, max_waiting=1024).start()
    app = create_app(service, tok, "bench", serve, None)
    port = free_port()
    with Server(app, port):
      url = f"http://127.0.0.1:{port}"
      asyncio.run(drive(url, prompts[: a.concurrency], a.max_tokens, a.concurrency))  # compile + warm up
      engine.flush_cache()
      out, wall = asyncio.run(drive(url, prompts, a.max_tokens, a.concurrency))
    service.close()
    prompt_tokens = sum(o["usage"]["prompt_tokens"] for o in out)
    cached = sum(o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in out)
    completion = sum(o["usage"]["completion_tokens"] for o in out)
    Z = serve.page_size
    shared = len(tok.encode(prompts[0].split(" [q")[0] + " [q"))
    ideal = a.groups * (a.per_group - 1) * (shared // Z * Z)
    itl = [x for o in out for x in o["itl"]]
    rows.append(
      (
        ("on" if radix else "off"),
        len(out) / wall,
        completion / wall,
        pct([o["ttft"] for o in out], 0.5),
        pct([o["ttft"] for o in out], 0.9),
        pct(itl, 0.5),
        pct(itl, 0.9),
        cached / prompt_tokens,
        ideal / prompt_tokens,
      )
    )
  print(
    f"\n{'cache':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'p90':>7} {'ITL p50':>8} {'p90':>7} "
    f"{'cached share':>13} {'ideal':>6}"
  )
  for name, rps, tps, t50, t90, i50, i90, share, ideal in rows:
    print(
      f"{name:>5} {rps:>7.2f} {tps:>10.1f} {1e3 * t50:>7.0f}ms {1e3 * t90:>5.0f}ms {1e3 * i50:>6.1f}ms "
      f"{1e3 * i90:>5.1f}ms {100 * share:>12.1f}% {100 * ideal:>5.1f}%"
    )
  print(
    f"\ncache on / off: {rows[1][1] / rows[0][1]:.2f}x requests/s "
    "(ITL is measured at delivery: multi-step decode streams serve.decode_steps tokens per chunk)"
  )


if __name__ == "__main__":
  main()
