"""Request bodies at the HTTP edge, before any route sees them: a size limit, and JSON whatever the label.

:class:`RequestBodyMiddleware` is plain ASGI, so it holds for every route and any server (uvicorn, Serve's
proxy, a test transport). A body whose ``Content-Length`` is over the limit gets a 413 at once, unread;
a body without one (chunked upload) is counted as it is read and the read fails with a 413 the moment
the count passes the limit, so no more than the limit is ever buffered. Every route here takes a JSON
body, so a POST labelled otherwise (curl's ``-d`` says ``application/x-www-form-urlencoded``) or not at
all is read as JSON: a body that is not JSON is still a 400, from the route's parsing.

What a request may ask for once its body is parsed (prompt sizes, counts) is :mod:`neox_ray.serve.server`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from neox_ray.serve.errors import HTTPAPIError, request_too_large

JSON_CONTENT_TYPE = b"application/json"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _is_json(content_type: bytes) -> bool:
    media_type = content_type.split(b";", 1)[0].strip().lower()
    return media_type == JSON_CONTENT_TYPE or media_type.endswith(b"+json")


class RequestBodyMiddleware:
    """``max_body_bytes=None`` disables the size limit; ``on_rejected(scope, status)`` is told of each
    request answered here without reaching a route (for the request counters)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int | None,
                 on_rejected: Callable[[Scope, int], None] | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_rejected = on_rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = [(name, value) for name, value in scope.get("headers", ()) if name != b"content-type"]
        content_type = next((value for name, value in scope.get("headers", ()) if name == b"content-type"), b"")
        if not _is_json(content_type):
            scope = {**scope, "headers": headers + [(b"content-type", JSON_CONTENT_TYPE)]}
        limit = self.max_body_bytes
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await self._reject(scope, send, limit)
            return

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPAPIError(request_too_large(limit))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except HTTPAPIError as exc:  # a route that read the body without the app's error handlers around it
            if response_started or exc.status_code != 413:
                raise
            await self._reject(scope, send, limit)

    async def _reject(self, scope: Scope, send: Send, limit: int) -> None:
        if self.on_rejected is not None:
            self.on_rejected(scope, 413)
        # The body stays unread: the server closes the connection after this response.
        await request_too_large(limit).response()(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
