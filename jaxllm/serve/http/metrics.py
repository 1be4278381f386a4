"""Prometheus metrics of one app (its own registry, so two apps in a process never mix counts).
Names follow vLLM's (`vllm:` -> `jaxllm:`) so existing dashboards need only the prefix changed.

Token and request counters and the live gauges are read from `EngineService.snapshot()` at scrape
time by a custom collector: the engine's own monotonic counters, exact and never double counted
(nothing here increments them). Latency histograms are fed per finished request from the
service's `on_finish` hook (engine thread; prometheus_client metrics are thread-safe).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# vLLM's buckets (seconds).
TTFT_BUCKETS = (
  0.001,
  0.005,
  0.01,
  0.02,
  0.04,
  0.06,
  0.08,
  0.1,
  0.25,
  0.5,
  0.75,
  1.0,
  2.5,
  5.0,
  7.5,
  10.0,
  20.0,
  40.0,
  80.0,
  160.0,
  640.0,
  2560.0,
)
ITL_BUCKETS = (
  0.01,
  0.025,
  0.05,
  0.075,
  0.1,
  0.15,
  0.2,
  0.3,
  0.4,
  0.5,
  0.75,
  1.0,
  2.5,
  5.0,
  7.5,
  10.0,
  20.0,
  40.0,
  80.0,
)
REQUEST_BUCKETS = (
  0.3,
  0.5,
  0.8,
  1.0,
  1.5,
  2.0,
  2.5,
  5.0,
  10.0,
  15.0,
  20.0,
  30.0,
  40.0,
  50.0,
  60.0,
  120.0,
  240.0,
  480.0,
  960.0,
  1920.0,
  7680.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
  """Counters and gauges straight from the service's snapshot, read when Prometheus scrapes."""

  def __init__(self, service):
    self.service = service

  def collect(self):
    s = self.service.snapshot()
    counters = (
      ("jaxllm:prompt_tokens", "Prompt tokens of admitted requests (each of n samples counts).", "prompt_tokens"),
      ("jaxllm:generation_tokens", "Generated tokens.", "generated_tokens"),
      ("jaxllm:cached_prompt_tokens", "Prompt tokens reused from the prefix cache.", "cached_tokens"),
      (
        "jaxllm:prefill_computed_tokens",
        "Tokens run through the model in prefill (recompute included).",
        "computed_tokens",
      ),
      ("jaxllm:num_preemptions", "Requests preempted (recomputed later) for lack of KV pages.", "preemptions"),
      (
        "jaxllm:engine_step_failures",
        "Engine steps that raised (isolation retries included); failed requests count as finished_reason=error.",
        "step_failures",
      ),
      ("jaxllm:compiles", "Step shapes the engine compiled (warm-up included); should not grow after it.", "compiles"),
      (
        "jaxllm:score_compiles",
        "Prompt-scoring shapes compiled (echo/prompt log-probs: one per new batch x length bucket, not warmed).",
        "score_compiles",
      ),
    )
    for name, doc, key in counters:
      yield CounterMetricFamily(name, doc, value=s[key])
    finished = CounterMetricFamily(
      "jaxllm:request_success",
      "Finished requests by finish reason (stop, length, abort = cancelled by the client, error = failed).",
      labels=["finished_reason"],
    )
    for reason, n in sorted(s["finished"].items()):
      finished.add_metric([reason], n)
    yield finished
    gauges = (
      ("jaxllm:num_requests_running", "Requests in the running batch.", s["running"]),
      ("jaxllm:num_requests_waiting", "Requests queued, not yet admitted.", s["waiting"] + s["inbox"]),
      ("jaxllm:kv_pages_used", "KV pages in use (by requests or the prefix cache).", s["pages_used"]),
      ("jaxllm:kv_pages_total", "KV pages in the pool.", s["pages_total"]),
      ("jaxllm:kv_pages_evictable", "Cached KV pages no request holds (freed on demand).", s["pages_evictable"]),
    )
    for name, doc, value in gauges:
      yield GaugeMetricFamily(name, doc, value=value)


class Metrics:
  def __init__(self, service):
    self.registry = CollectorRegistry()
    self.registry.register(_EngineCollector(service))
    hist = lambda name, doc, buckets: Histogram(name, doc, buckets=buckets, registry=self.registry)
    self.ttft = hist("jaxllm:time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS)
    self.itl = hist(
      "jaxllm:inter_token_latency_seconds",
      "Between consecutive generated tokens (tokens of one multi-step decode call share a time).",
      ITL_BUCKETS,
    )
    self.e2e = hist("jaxllm:e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
    self.queue = hist("jaxllm:request_queue_time_seconds", "Arrival to first admission.", REQUEST_BUCKETS)

  def on_finish(self, req, timings) -> None:
    """EngineService's on_finish hook (engine thread): one finished request's latencies."""
    self.e2e.observe(timings.e2e)
    self.queue.observe(timings.queue)
    if req.token_times:  # an aborted request may have none: no first token to time
      self.ttft.observe(timings.ttft)
    for dt in timings.itl:
      self.itl.observe(dt)

  def render(self) -> bytes:
    return generate_latest(self.registry)
