"""Serving over HTTP, radix cache off vs on, side by side in one process.

A shared-prefix workload (G groups of K requests; each group shares a long system prompt, each
request adds its own question) is sent by C concurrent streaming clients to `/v1/completions` of a
live server on loopback (the real FastAPI app on uvicorn, the real engine thread). Per setting it
prints requests/s, output tokens/s, TTFT and inter-token latency p50/p90 (measured by the client at
each streamed chunk), and the share of prompt tokens served from the cache against the ideal (every
request but the first of its group reuses the system prompt's whole pages).

  python benchmarks/bench_http.py                       # tiny random model, byte tokenizer
  python benchmarks/bench_http.py --groups 8 --per-group 8 --system-len 512 --concurrency 16   # lighter sharing
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


async def one(client, url, prompt, max_tokens, out):
  t0 = time.perf_counter()
  times, usage = [], None
  body = {
    "model": "bench",
    "prompt": prompt,
    "max_tokens": max_tokens,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
  }
  async with client.stream("POST", url + "/v1/completions", json=body) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if chunk.get("usage"):
        usage = chunk["usage"]
      if chunk.get("choices") and chunk["choices"][0].get("text"):
        times.append(time.perf_counter())
  out.append(
    {
      "ttft": times[0] - t0 if times else float("nan"),
      "itl": [b - a for a, b in zip(times, times[1:])],
      "e2e": time.perf_counter() - t0,
      "usage": usage,
    }
  )


async def drive(url, prompts, max_tokens, concurrency):
  out, queue = [], list(prompts)
  async with httpx.AsyncClient(timeout=600) as client:

    async def worker():
      while queue:
        await one(client, url, queue.pop(), max_tokens, out)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, time.perf_counter() - t0


def pct(xs, q):
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


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
  a = ap.parse_args()
  tok = load_tokenizer("byte")
  longest = a.system_len + a.question_len + 32 + a.max_tokens
  cfg = dataclasses.replace(MODEL_PRESETS[a.model], max_seq_len=pow2_bucket(longest))
  params = init_params(cfg, 0)
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
