"""The FastAPI app: routes, API-key check, body limits; the work is in the modules it calls.

  GET  /health                readiness: 200 once warmed up, engine alive, not draining (health.py)
  GET  /health/live           liveness: 200 while the engine thread runs (/health/ready = /health)
  GET  /metrics               Prometheus text (metrics.py)
  GET  /v1/models             the served model
  POST /v1/completions        OpenAI completions (protocol.parse_completion, responses.Completions)
  POST /v1/chat/completions   OpenAI chat (chat.ChatTemplate, responses.ChatCompletions)
  POST /generate              SGLang's native API, token ids in and out (native.Generate)
  POST /flush_cache           drop the prefix cache (SGLang); 409 while requests run
  POST /tokenize, /detokenize vLLM's: text or messages <-> token ids (tokenize.py)
  GET  /tokenizer_info        vLLM's: the special tokens and chat template (tokenize.py)

When serve.api_key is set, /v1/*, /generate, /flush_cache and the tokenizer routes need
`Authorization: Bearer KEY`; /health and /metrics stay open for probes and scrapers (as in vLLM).
Bodies are JSON, at most serve.max_body_bytes (checked on Content-Length before reading, and on the
bytes actually read, so a chunked upload cannot get around it). Parsing (tokenizing, chat-template rendering) runs in a
worker thread, never on the event loop, so a long prompt does not stall every other stream.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from jaxllm.config import ServeConfig
from jaxllm.io.load import eos_ids as model_eos_ids
from jaxllm.serve.http import fields, protocol
from jaxllm.serve.http.bridge import EngineCall, PromptOnly
from jaxllm.serve.http.chat import ChatTemplate
from jaxllm.serve.http.errors import APIError, bad_request, install_handlers
from jaxllm.serve.http.health import Health
from jaxllm.serve.http.metrics import CONTENT_TYPE, Metrics
from jaxllm.serve.http.native import Generate
from jaxllm.serve.http.responses import ChatCompletions, Completions, Output, TokenText, first_error
from jaxllm.serve.http.tokenize import detokenize, tokenize, tokenizer_info
from jaxllm.serve.service import EngineDead, EngineService

FLUSH_TIMEOUT_S = 60.0  # /flush_cache waits this long for the engine thread's next step boundary


def create_app(
  service: EngineService,
  tokenizer,
  model_name: str,
  serve_cfg: ServeConfig,
  chat_template: str | None = None,
  eos_ids: tuple | None = None,
  request_defaults: dict | None = None,
  warmup: bool = True,
) -> FastAPI:
  """An app serving `service` (started and closed by the caller). chat_template: the model's Jinja
  chat template, None for chat.DEFAULT_TEMPLATE. eos_ids: every end-of-sequence id (a loaded model's
  LoadedModel.eos_ids); None: the tokenizer's. request_defaults: values for fields a request omits
  (LoadedModel.request_defaults: generation_config.json's sampling defaults). Adds the latency
  histograms as one of the service's finish hooks (call before service.start()). warmup: queue
  Engine.warmup() on the engine thread now; /health is 503 until it is done."""
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
    defaults=dict(request_defaults or {}),
  )
  template = ChatTemplate(chat_template, tokenizer, serve_cfg.tool_parser)
  text_of = TokenText(tokenizer)
  metrics = Metrics(service)
  service.add_finish_hook(metrics.on_finish)
  started = int(time.time())

  app = FastAPI(title="jaxllm", docs_url=None, redoc_url=None, openapi_url=None)
  health = Health(service, warmup)
  if warmup:
    service.warmup()
  app.state.service, app.state.metrics, app.state.info, app.state.health = service, metrics, info, health
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
      parsed = json.loads(b"".join(body), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
      raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    except RecursionError:
      raise bad_request(
        f"the request body nests deeper than {fields.MAX_JSON_DEPTH} levels", None, "invalid_json"
      ) from None
    fields.check_json(parsed)
    return parsed

  async def run(request: Request, parsed: protocol.Parsed, fmt):
    """Submit the parsed request and answer with fmt's streamed chunks or its one object."""
    health.check_accepting()
    if parsed.generate:
      call = EngineCall(service, request.receive).submit(
        parsed.prompt_ids, parsed.sampling, parsed.choice_prompts, parsed.stream
      )
    else:
      call = PromptOnly(parsed.choice_prompts)
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

  async def score(parsed: protocol.Parsed) -> list:
    """The prompts' log-probs (echo with logprobs, return_prompt_logprob): computed on the engine
    thread between steps (EngineService.score), waited for off the event loop."""
    try:
      return await asyncio.to_thread(service.score, parsed.all_prompts, parsed.prompt_logprobs)
    except EngineDead as e:
      raise APIError(503, f"the engine is not running: {e}", None, "engine_dead") from None
    except Exception as e:
      raise APIError(500, f"scoring the prompt failed: {type(e).__name__}: {e}", None, "engine_error") from None

  @app.get("/health")
  @app.get("/health/ready")
  async def ready():
    if (e := health.ready_error()) is not None:
      raise e
    return {"status": "ok"}

  @app.get("/health/live")
  async def live():
    if (e := health.live_error()) is not None:
      raise e
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
    parsed = await run_in_threadpool(protocol.parse_completion, await read_json(request), info, tokenizer)
    fmt = Completions(parsed, info.name, text_of)
    if parsed.prompt_logprobs >= 0:
      fmt.scores = await score(parsed)
    return await run(request, parsed, fmt)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    parsed = await run_in_threadpool(protocol.parse_chat, await read_json(request), info, template)
    return await run(request, parsed, ChatCompletions(parsed, info.name, text_of))

  @app.post("/generate")
  async def generate(request: Request):
    parsed = await run_in_threadpool(protocol.parse_generate, await read_json(request), info, tokenizer)
    fmt = Generate(parsed)
    if parsed.prompt_logprobs >= 0:
      fmt.scores = await score(parsed)
    return await run(request, parsed, fmt)

  @app.post("/tokenize")
  async def tokenize_route(request: Request):
    return tokenize(await read_json(request), info, tokenizer, template, text_of)

  @app.post("/detokenize")
  async def detokenize_route(request: Request):
    return detokenize(await read_json(request), info, tokenizer)

  @app.get("/tokenizer_info")
  async def tokenizer_info_route(request: Request):
    authorize(request)
    return tokenizer_info(info, tokenizer, template)

  @app.post("/flush_cache")
  async def flush_cache(request: Request):
    authorize(request)
    try:  # waits for the engine thread's next step boundary
      flushed = await asyncio.to_thread(service.flush_cache, FLUSH_TIMEOUT_S)
    except (EngineDead, TimeoutError) as e:
      raise APIError(503, f"the cache could not be flushed: {e}", None, "engine_unavailable") from None
    if not flushed:
      raise APIError(
        409, "requests are in flight; the cache is flushed only when the engine is idle", None, "requests_in_flight"
      )
    return {"flushed": True}

  return app


def _no_constants(name: str):
  raise ValueError(f"{name} is not valid JSON")
