"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the right status.

:class:`APIError` is what route code raises; :func:`install_error_handlers` turns it, FastAPI's request
validation errors (422 by default; 400 naming ``param`` here), routing errors and anything unexpected
into that shape. Messages are short: they name the field and the rule, never echo the input or show
internals (an unexpected error is logged here and answered with a generic 500). Deciding *which* error
applies is the routes' job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from neox_ray.engine.schema import describe_error

logger = logging.getLogger(__name__)

# FastAPI's detail when reading the body fails other than by a JSON syntax error (bad UTF-8, deep nesting, ...).
FASTAPI_BODY_ERROR = "There was an error parsing the body"
# Seconds a client is told to wait after a 503 (queue full); one engine step is far shorter.
RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(self, status_code: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class HTTPAPIError(StarletteHTTPException):
    """An :class:`APIError` raised where only HTTP exceptions pass through untouched (FastAPI turns any other
    exception raised while it reads a request body into a generic 400)."""

    def __init__(self, error: APIError):
        super().__init__(error.status_code, error.message, headers=error.headers)
        self.error = error


def bad_request(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, param=None, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def request_too_large(limit_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server accepts ({limit_bytes} bytes)",
                    code="request_too_large")


def request_timeout(timeout_s: float) -> APIError:
    return APIError(408, f"the request did not finish within its timeout of {timeout_s:g}s and was aborted",
                    error_type="timeout_error", code="request_timeout")


def queue_full(detail: str) -> APIError:
    return APIError(503, f"the server is at capacity ({detail}); retry after {RETRY_AFTER_S}s",
                    error_type="server_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})


def engine_dead(detail: str) -> APIError:
    return APIError(503, f"the engine is not running: {detail}", error_type="server_error", code="engine_dead")


_LEADING_NAME = re.compile(r"^([a-z_]+)\b")


def param_from_message(message: str, known: set[str], default: str | None) -> str | None:
    """SamplingParams' messages start with the field they are about (``"top_p must be ..."``)."""
    match = _LEADING_NAME.match(message)
    if match and match.group(1) in known:
        return match.group(1)
    if message.startswith("stop strings"):
        return "stop"
    return default


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ())]
    if location and location[0] == "body":
        location = location[1:]
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('msg', '')}", None)
    if not location:
        if first.get("type") == "missing":
            return bad_request("the request body is empty; expected a JSON object", None)
        return bad_request(f"invalid request body: {first.get('msg', 'expected a JSON object')}", None)
    param = location[0]
    if first.get("type") == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {'.'.join(location)}", param)
    if first.get("type") == "missing":
        return bad_request(f"missing required argument: {param}", param)
    # One short line naming the field, as SamplingParams words it; never the whole input echoed back.
    loc = tuple(first.get("loc", ()))
    return bad_request(describe_error({**first, "loc": loc[1:] if loc[:1] == ("body",) else loc}), param)


def install_error_handlers(app: FastAPI, on_error: Callable[[Request, int], None] | None = None) -> None:
    """``on_error(request, status)`` is told of every error response (for the request counters)."""

    def respond(request: Request, error: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(request, error.status_code)
        return error.response()

    @app.exception_handler(APIError)
    async def handle_api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, HTTPAPIError):
            return respond(request, exc.error)
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:  # not JSON that json.loads can read
            return respond(request, bad_request("the request body is not valid JSON (it must be UTF-8, not nested "
                                                "too deeply, with numbers of at most 4300 digits)", None))
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return respond(request, APIError(exc.status_code, str(exc.detail), error_type=error_type))

    @app.exception_handler(Exception)
    async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return respond(request, APIError(500, "internal server error (logged on the server)",
                                         error_type="server_error"))
