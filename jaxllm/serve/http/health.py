"""Liveness and readiness of one server, as Kubernetes probes read them.

  GET /health         readiness: 200 {"status": "ok"} when the engine is warmed up, its thread alive
                      and the server not draining; 503 in OpenAI's error shape saying which otherwise.
                      The route vLLM and SGLang users already probe; also at /health/ready.
  GET /health/live    liveness: 200 while the engine thread runs (warming up and draining included);
                      503 once it has stopped (closed, crashed, or its device failed), which only a
                      restart fixes.

Readiness before warm-up: create_app queues Engine.warmup() on the engine thread, ahead of any
request, so the first requests never wait on compiles a probe did not see. Draining (SIGTERM, see
server.draining_server): readiness goes 503 so load balancers stop sending, new generation requests
get 503, and running ones finish.
"""

from __future__ import annotations

from jaxllm.serve.http.errors import APIError


class Health:
  def __init__(self, service, warmup: bool = True):
    """`warmup`: readiness waits for service.warmed_up (create_app queued the warm-up)."""
    self.service, self.warmup = service, warmup
    self.draining = False  # set on SIGTERM: finish what runs, take nothing new

  def live_error(self) -> APIError | None:
    if self.service.stopped:
      return APIError(
        503, f"the engine is not running: {self.service.dead or 'its thread stopped'}", None, "engine_dead"
      )
    return None

  def ready_error(self) -> APIError | None:
    if (e := self.live_error()) is not None:
      return e
    if self.draining:
      return APIError(503, "the server is shutting down; it finishes running requests only", None, "draining")
    if self.warmup and not self.service.warmed_up:
      return APIError(503, "the engine is warming up (compiling its step shapes)", None, "warming_up")
    return None

  def check_accepting(self) -> None:
    """New generation requests: refused (503) while draining or when the engine is gone; accepted
    (queued behind the warm-up) while warming up."""
    if (e := self.live_error()) is not None:
      raise e
    if self.draining:
      raise APIError(503, "the server is shutting down; send the request elsewhere", None, "draining")
