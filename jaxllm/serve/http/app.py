"""The FastAPI app: routes, API-key check, body limits; the work is in the modules it calls.

  GET  /health                liveness (200 while the engine thread runs)
  GET  /metrics               Prometheus text (metrics.py)
  GET  /v1/models             the served model
  POST /v1/completions        OpenAI completions (protocol.parse_completion, responses.Completions)
  POST /v1/chat/completions   OpenAI chat (chat.ChatTemplate, responses.ChatCompletions)
  POST /generate              SGLang's native API, token ids in and out (native.Generate)
  POST /flush_cache           drop the prefix cache (SGLang); 409 while requests run

When serve.api_key is set, /v1/*, /generate and /flush_cache need `Authorization: Bearer KEY`;
/health and /metrics stay open for probes and scrapers (as in vLLM). Bodies are JSON, at most
serve.max_body_bytes (checked on Content-Length before reading, and on the bytes actually read,
so a chunked upload cannot get around it).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from jaxllm.config import ServeConfig
from jaxllm.io.load import eos_ids as model_eos_ids
from jaxllm.serve.http import protocol
from jaxllm.serve.http.bridge import EngineCall
from jaxllm.serve.http.chat import ChatTemplate
from jaxllm.serve.http.errors import APIError, bad_request, install_handlers
from jaxllm.serve.http.metrics import CONTENT_TYPE, Metrics
from jaxllm.serve.http.native import Generate
from jaxllm.serve.http.responses import ChatCompletions, Completions, Output, TokenText, first_error
from jaxllm.serve.service import EngineService


def create_app(
  service: EngineService,
  tokenizer,
  model_name: str,
  serve_cfg: ServeConfig,
  chat_template: str | None = None,
  eos_ids: tuple | None = None,
) -> FastAPI:
  """An app serving `service` (started and closed by the caller). chat_template: the model's Jinja
  chat template, None for chat.DEFAULT_TEMPLATE. eos_ids: every end-of-sequence id (a loaded model's
  LoadedModel.eos_ids); None: the tokenizer's. Adds the latency histograms as one of the service's
  finish hooks (call before service.start())."""
  engine = service.engine
  pool_tokens = service.snapshot()["pages_total"] * engine.page_size
  if eos_ids is None:
    eos_ids = model_eos_ids(engine.cfg.vocab_size, tokenizer)
  info = protocol.ModelInfo(
    name=model_name,
    vocab_size=engine.cfg.vocab_size,
    context=min(engine.cfg.max_seq_len, pool_tokens),
    eos_ids=tuple(eos_ids),
    max_n=serve_cfg.max_n,
  )
  template = ChatTemplate(chat_template, tokenizer)
  text_of = TokenText(tokenizer)
  metrics = Metrics(service)
  service.add_finish_hook(metrics.on_finish)
  started = int(time.time())

  app = FastAPI(title="jaxllm", docs_url=None, redoc_url=None, openapi_url=None)
  app.state.service, app.state.metrics, app.state.info = service, metrics, info
  install_handlers(app)

  def authorize(request: Request) -> None:
    if not serve_cfg.api_key:
      return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), serve_cfg.api_key.encode()):
      raise APIError(
        401,
        "missing or wrong API key: send the header 'Authorization: Bearer <serve.api_key>'",
        None,
        "invalid_api_key",
        {"WWW-Authenticate": "Bearer"},
      )

  async def read_json(request: Request):
    authorize(request)
    limit = serve_cfg.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:  # refuse before reading a byte of it
      if not length.isdigit():
        raise bad_request(f"invalid Content-Length header {length!r}", None, "invalid_header")
      if int(length) > limit:
        raise APIError(
          413, f"the request body is {length} bytes, over serve.max_body_bytes={limit}", None, "request_too_large"
        )
    body, size = [], 0
    try:
      async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
          raise APIError(413, f"the request body is over serve.max_body_bytes={limit} bytes", None, "request_too_large")
        body.append(chunk)
    except ClientDisconnect:  # gone mid-upload: nobody to answer, nothing was submitted
      raise APIError(400, "the client disconnected while sending the body", None, "client_disconnected") from None
    try:
      return json.loads(b"".join(body), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
      raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None

  async def run(request: Request, parsed: protocol.Parsed, fmt):
    """Submit the parsed request and answer with fmt's streamed chunks or its one object."""
    call = EngineCall(service, request.receive).submit(parsed.prompt_ids, parsed.sampling, parsed.stream)
    if parsed.stream:

      async def chunks():
        try:
          async for chunk in fmt.stream(call.events()):
            yield chunk
        finally:  # also on cancellation when the client goes away
          call.close()

      return StreamingResponse(
        chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
      )
    outputs = [Output() for _ in range(parsed.n)]
    try:
      async for i, ev in call.events():
        outputs[i].add(ev)
    finally:
      call.close()
    if (err := first_error(outputs)) is not None:
      raise APIError(500, f"generation failed: {err}", None, "engine_error")
    return JSONResponse(fmt.response(outputs))

  @app.get("/health")
  async def health():
    if service.stopped:
      raise APIError(503, "the engine thread has stopped", None, "engine_stopped")
    return {"status": "ok"}

  @app.get("/metrics")
  async def prometheus():
    return Response(metrics.render(), media_type=CONTENT_TYPE)

  @app.get("/v1/models")
  async def models(request: Request):
    authorize(request)
    return {
      "object": "list",
      "data": [
        {"id": info.name, "object": "model", "created": started, "owned_by": "jaxllm", "max_model_len": info.context}
      ],
    }

  @app.post("/v1/completions")
  async def completions(request: Request):
    parsed = protocol.parse_completion(await read_json(request), info, tokenizer)
    return await run(request, parsed, Completions(parsed, info.name, text_of))

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    parsed = protocol.parse_chat(await read_json(request), info, template)
    return await run(request, parsed, ChatCompletions(parsed, info.name, text_of))

  @app.post("/generate")
  async def generate(request: Request):
    parsed = protocol.parse_generate(await read_json(request), info, tokenizer)
    return await run(request, parsed, Generate(parsed))

  @app.post("/flush_cache")
  async def flush_cache(request: Request):
    authorize(request)
    if not await asyncio.to_thread(service.flush_cache):  # waits for the engine thread's next boundary
      raise APIError(
        409, "requests are in flight; the cache is flushed only when the engine is idle", None, "requests_in_flight"
      )
    return {"flushed": True}

  return app


def _no_constants(name: str):
  raise ValueError(f"{name} is not valid JSON")
