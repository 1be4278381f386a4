"""The HTTP server: the only code in jaxllm that sees HTTP, JSON or chat text.

OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models, SGLang's native /generate
(token ids in and out, for RL clients), /health, /metrics (Prometheus) and /flush_cache, in front
of an EngineService (jaxllm.serve.service), which owns the engine thread.

  protocol.py   request bodies -> validated Parsed requests (every field checked, 400s that name it)
  chat.py       chat messages -> prompt through the model's Jinja chat template (or a plain default)
  bridge.py     engine-thread events -> asyncio; client disconnects abort engine requests
  responses.py  events -> OpenAI objects and server-sent-event chunks
  native.py     events -> SGLang /generate objects
  metrics.py    Prometheus registry of one app
  errors.py     OpenAI's error shape for every failure
  app.py        create_app: the routes
  server.py     load a model, build engine + service + app, run uvicorn (what serve.py calls)
"""

from jaxllm.serve.http.app import create_app

__all__ = ["create_app"]
