"""The three binary device routes as plain ASGI, in front of FastAPI.

``POST /v1/handshake/hello``, ``POST /v1/handshake/finish`` and ``POST
/v1/sessions/{session_id}/records`` carry every handshake and every record, so they skip the
framework: no routing table walk, no ``Request`` object, no dependency solving, no response
class. What they do is what the FastAPI routes did, in the same order (docs/API.md): a
Content-Length over the limit is 413; the source's rate limit and blocks (429); anything
but ``application/octet-stream`` is 415; the body is read up to the limit (413 past it);
``Service`` answers; errors leave through the one error table (``errors.ERRORS``). Another
method on these paths is 405 with ``Allow: POST``. Each request is counted under its route
template, as ``RequestCounter`` counts the others. docs/PERFORMANCE.md says what this saves.

``openapi_paths`` documents the routes in the app's OpenAPI spec, where FastAPI would have.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from starlette.types import ASGIApp, Receive, Scope, Send

from qflare.server.errors import HttpError
from qflare.server.metrics import Metrics

log = logging.getLogger("qflare.server")

OCTET: Final = "application/octet-stream"
_OCTET_HEADER: Final = OCTET.encode()
_CONTENT_TYPE = re.compile(rb"^\s*([^;\s]+)")
_RECORDS = re.compile(r"^/v1/sessions/([^/]+)/records$")

# (data, source) -> answer; for records also the session id from the path.
Handler = Callable[[bytes, str], Awaitable[bytes]]
ErrorAnswer = Callable[[BaseException], Any]  # -> a Starlette Response


@dataclass(frozen=True)
class BinaryRoute:
    template: str  # the route label of metrics and of the OpenAPI spec
    summary: str
    description: str
    operation_id: str
    session_param: bool = False


HELLO: Final = BinaryRoute(
    "/v1/handshake/hello",
    "Hello",
    "ClientHello in, ServerHello out (PROTOCOL.md 5).",
    "hello_v1_handshake_hello_post",
)
FINISH: Final = BinaryRoute(
    "/v1/handshake/finish",
    "Finish",
    "ClientFinish in; a control record sealed in the new session out.",
    "finish_v1_handshake_finish_post",
)
RECORDS: Final = BinaryRoute(
    "/v1/sessions/{session_id}/records",
    "Record",
    "One sealed record in (FL update, control op), the sealed answer out.",
    "record_v1_sessions__session_id__records_post",
    session_param=True,
)
ROUTES: Final = (HELLO, FINISH, RECORDS)


class BinaryRoutes:
    """ASGI middleware serving ``ROUTES``; every other request goes on to ``app``.

    ``hello``, ``finish`` take ``(body, source)``; ``record`` takes ``(session_id, body,
    source)``. ``admit(source)`` raises ``RateLimited``/``SourceBlocked`` (and records the
    event). ``error_response(exc)`` is the app's one error answer.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        metrics: Metrics,
        admit: Callable[[str], Awaitable[None]],
        hello: Handler,
        finish: Handler,
        record: Callable[[str, bytes, str], Awaitable[bytes]],
        error_response: ErrorAnswer,
    ) -> None:
        self.app, self.limit, self.metrics, self.admit = app, limit, metrics, admit
        self._fixed: dict[str, tuple[BinaryRoute, Handler]] = {
            HELLO.template: (HELLO, hello),
            FINISH.template: (FINISH, finish),
        }
        self._record = record
        self._error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        fixed = self._fixed.get(path)
        if fixed is not None:
            route, handler = fixed
        else:
            match = _RECORDS.match(path) if path.startswith("/v1/sessions/") else None
            if match is None:
                await self.app(scope, receive, send)
                return
            route, session_id = RECORDS, match.group(1)

            async def handler(data: bytes, source: str) -> bytes:
                return await self._record(session_id, data, source)

        status = 500
        try:
            status = await self._serve(scope, receive, send, handler)
        finally:
            self.metrics.requests.labels(route.template, str(status)).inc()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, handler: Handler) -> int:
        if scope["method"] != "POST":
            response = self._error_response(
                HttpError(405, "method_not_allowed", "method not allowed")
            )
            response.headers["allow"] = "POST"
            await response(scope, receive, send)
            return 405
        content_type = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    return await self._too_large(scope, receive, send)
            elif name == b"content-type":
                content_type = value
        client = scope.get("client")
        source = client[0] if client else "unknown"
        try:
            await self.admit(source)
            kind = _CONTENT_TYPE.match(content_type)
            if kind is None or kind.group(1).lower() != _OCTET_HEADER:
                raise HttpError(415, "unsupported_media_type", f"send {OCTET}")
            data = await self._body(receive)
            if data is None:
                return await self._too_large(scope, receive, send)
            answer = await handler(data, source)
        except _Disconnected:
            return 499  # nobody to answer (counted as nginx counts it)
        except Exception as exc:
            response = self._error_response(exc)
            if response.status_code >= 500:
                log.error("unhandled error on %s", scope["path"], exc_info=exc)
            await response(scope, receive, send)
            return int(response.status_code)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", _OCTET_HEADER),
                    (b"content-length", str(len(answer)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})
        return 200

    async def _body(self, receive: Receive) -> bytes | None:
        """The request body, or None once it runs over the limit (the rest is not read)."""
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)  # one chunk (the usual case): that chunk, not a copy

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> int:
        response = self._error_response(HttpError(413, "too_large", "request body too large"))
        response.headers["connection"] = "close"
        await response(scope, receive, send)
        return 413


class _Disconnected(Exception):
    """The client went away before its body arrived."""


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI path items of ``ROUTES``: octet-stream in, octet-stream out."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    paths: dict[str, Any] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "tags": ["device"],
            "summary": route.summary,
            "description": route.description,
            "operationId": route.operation_id,
            "requestBody": {"required": True, "content": {OCTET: binary}},
            "responses": {
                "200": {"description": "Successful Response", "content": {OCTET: binary}},
                "4XX": {"description": 'Refused: ``{"error": code, "message": text}``'},
            },
        }
        if route.session_param:
            operation["parameters"] = [
                {
                    "name": "session_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "title": "Session Id"},
                }
            ]
        paths[route.template] = {"post": operation}
    return paths


__all__ = ["ROUTES", "BinaryRoute", "BinaryRoutes", "openapi_paths"]
