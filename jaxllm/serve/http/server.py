"""Everything `python serve.py` does, so the entry point stays thin: find and load the model and its
tokenizer, build engine + service + app, bind uvicorn on serve.host:serve.port.

The model is a training checkpoint (`--checkpoint DIR`: its tokenizer is the run's train.tokenizer)
or a Hugging Face directory (`--hf DIR`: its tokenizer.json and chat template). Without either, the
newest checkpoint of `python train.py`'s default run (runs/default/checkpoints) is served.

Shutdown (SIGTERM, or Ctrl-C): DrainingServer first drains -- /health turns 503, new requests get 503,
running ones finish -- for at most serve.drain_timeout_s; requests still running then end with an
error (a 500 in OpenAI's shape, or an error event in a stream), and uvicorn closes the connections.
A second signal stops at once.
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time

from jaxllm.config import ServeConfig, TrainConfig
from jaxllm.io import LoadedModel

DEFAULT_CHECKPOINTS = os.path.join(TrainConfig().out_dir, "checkpoints")


class NoModel(RuntimeError):
  """Nothing to serve; the message says how to get a model."""


def load_model(checkpoint: str | None = None, hf: str | None = None, mesh=None, plan=None) -> LoadedModel:
  """The model `python serve.py` serves (--checkpoint DIR, --hf DIR, or the default run's newest
  checkpoint), loaded by jaxllm.io.load_model and placed on `mesh` when given."""
  from jaxllm.io import load_model as load

  if checkpoint and hf:
    raise NoModel("give either --checkpoint or --hf, not both")
  shardings = None
  if mesh is not None:
    from jaxllm.parallel import param_shardings

    shardings = lambda mdef: param_shardings(mdef, mesh, plan)
  return load(hf or checkpoint or _default_checkpoint(), shardings=shardings)


def _default_checkpoint() -> str:
  from jaxllm.io.checkpoint import CheckpointError, read_meta

  try:
    read_meta(DEFAULT_CHECKPOINTS)
  except CheckpointError:
    raise NoModel(
      f"no model to serve: there is no checkpoint in {DEFAULT_CHECKPOINTS}. Train one with "
      f"`python train.py` (serve.py then finds it there), or pass --checkpoint DIR (a training run's "
      f"checkpoints folder) or --hf DIR (a Hugging Face model directory)"
    ) from None
  return DEFAULT_CHECKPOINTS


def build(model: LoadedModel, serve_cfg: ServeConfig, mesh=None, plan=None):
  """-> (app, service), the service started. Close it when done (service.close())."""
  from jaxllm.serve.engine import Engine
  from jaxllm.serve.http.app import create_app
  from jaxllm.serve.service import EngineService

  engine = Engine(model.cfg, model.params, serve_cfg, mesh=mesh, plan=plan, tokenizer=model.tokenizer)
  service = EngineService(engine, max_waiting=serve_cfg.max_waiting).start()
  app = create_app(
    service,
    model.tokenizer,
    serve_cfg.model_name or model.name,
    serve_cfg,
    model.chat_template,
    eos_ids=model.eos_ids,
    request_defaults=model.request_defaults,
  )
  return app, service


def example_curl(serve_cfg: ServeConfig, model_name: str) -> str:
  host = "127.0.0.1" if serve_cfg.host in ("0.0.0.0", "::") else serve_cfg.host
  body = json.dumps({"model": model_name, "prompt": "Once upon a time", "max_tokens": 32})
  auth = ' -H "Authorization: Bearer $JAXLLM_API_KEY"' if serve_cfg.api_key else ""  # the shell fills it in
  return (
    f"curl http://{host}:{serve_cfg.port}/v1/completions -H 'Content-Type: application/json'{auth} "
    f"-d {shlex.quote(body)}"
  )


GRACE_S = 2.0  # after the drain, uvicorn's wait for responses still being written


def draining_server(app, service, drain_timeout_s: float, **uvicorn_kw):
  """A uvicorn.Server for `app` that drains `service` on SIGTERM/SIGINT (see the module doc)."""
  import uvicorn

  class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig, frame):
      health = app.state.health
      if health.draining:  # a second signal: stop now
        self.force_exit = True
        return super().handle_exit(sig, frame)
      health.draining = True
      threading.Thread(target=self._drain, args=(sig, frame), name="jaxllm-drain", daemon=True).start()

    def _drain(self, sig, frame):
      deadline = time.monotonic() + drain_timeout_s
      while service.busy and time.monotonic() < deadline:
        time.sleep(0.05)
      if service.busy:  # each request still running gets an error in OpenAI's shape, not a cut connection
        service.close(
          f"the server shut down: serve.drain_timeout_s={drain_timeout_s:g} passed before this request finished"
        )
      super().handle_exit(sig, frame)  # uvicorn's shutdown: close the listeners and connections

  return DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=GRACE_S, **uvicorn_kw))


def serve(model: LoadedModel, serve_cfg: ServeConfig, mesh=None, plan=None) -> None:
  """Build and serve until interrupted (Ctrl-C, SIGTERM: drained first)."""
  app, service = build(model, serve_cfg, mesh, plan)
  name = app.state.info.name
  print(
    f"serving {model.source} as model '{name}' on http://{serve_cfg.host}:{serve_cfg.port}  "
    f"(OpenAI API under /v1, native /generate, /metrics, /health; ready once warmed up)"
  )
  key_note = "  (export JAXLLM_API_KEY=<serve.api_key> first)" if serve_cfg.api_key else ""
  print(f"try:{key_note}\n  {example_curl(serve_cfg, name)}", flush=True)
  try:
    server = draining_server(
      app, service, serve_cfg.drain_timeout_s, host=serve_cfg.host, port=serve_cfg.port, log_level="info"
    )
    server.run()
  finally:
    service.close()
