"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the right status.

Every failure the server reports -- a bad field, an unknown model, a full queue, a crash inside a
handler -- goes through `APIError` or the handlers below, so clients (the `openai` package among
them) can always parse it, and a bad request never takes the server down.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("jaxllm.serve.http")

# OpenAI's error types by status (their API reference, "Error codes").
_TYPES = {
  400: "invalid_request_error",
  401: "authentication_error",
  404: "invalid_request_error",
  405: "invalid_request_error",
  409: "invalid_request_error",
  413: "invalid_request_error",
  500: "server_error",
  503: "server_error",
}


class APIError(Exception):
  """An error response. `param` names the offending request field (None if none)."""

  def __init__(
    self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
  ):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return error_body(self.status, self.message, self.param, self.code)

  def response(self) -> JSONResponse:
    return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
  return {
    "error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
  }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
  return APIError(400, message, param, code)


def install_handlers(app: FastAPI) -> None:
  """Route every error, including Starlette's own 404/405 and unexpected exceptions, to the shape."""

  @app.exception_handler(APIError)
  async def _api_error(request: Request, e: APIError):
    return e.response()

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request: Request, e: StarletteHTTPException):
    message = {
      404: f"no route {request.method} {request.url.path}",
      405: f"method {request.method} is not allowed on {request.url.path}",
    }.get(e.status_code, str(e.detail))
    return JSONResponse(
      error_body(e.status_code, message), status_code=e.status_code, headers=getattr(e, "headers", None)
    )

  @app.exception_handler(Exception)
  async def _crash(request: Request, e: Exception):
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)
