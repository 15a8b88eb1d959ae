"""BinaryRoutes on its own: dispatch, the checks in their order, errors, counting.

The handlers here are plain functions that record what reached them; the whole server path
(the real Service behind these routes) is covered by tests/e2e.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from qflare.errors import HandshakeFailed
from qflare.server.app import _error_response
from qflare.server.binary_routes import ROUTES, BinaryRoutes, openapi_paths
from qflare.server.errors import RateLimited
from qflare.server.metrics import Metrics

OCTET = {"content-type": "application/octet-stream"}
LIMIT = 64


class Harness:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.metrics = Metrics()
        self.refuse: BaseException | None = None
        self.fail: BaseException | None = None
        self.app = BinaryRoutes(
            self.fallback,
            limit=LIMIT,
            metrics=self.metrics,
            admit=self.admit,
            hello=self.hello,
            finish=self.finish,
            record=self.record,
            error_response=_error_response,
        )

    async def fallback(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append(("fallback", scope["path"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def admit(self, source: str) -> None:
        self.calls.append(("admit", source))
        if self.refuse is not None:
            raise self.refuse

    async def hello(self, data: bytes, source: str) -> bytes:
        self.calls.append(("hello", data))
        if self.fail is not None:
            raise self.fail
        return b"server-hello:" + data

    async def finish(self, data: bytes, source: str) -> bytes:
        self.calls.append(("finish", data))
        return b"finished"

    async def record(self, session_id: str, data: bytes, source: str) -> bytes:
        self.calls.append(("record", (session_id, data)))
        return b"sealed"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, client=("192.0.2.7", 1234)),
            base_url="http://qflare",
        )

    def counted(self, route: str, status: int) -> float:
        value = self.metrics.registry.get_sample_value(
            "qflare_http_requests_total", {"route": route, "status": str(status)}
        )
        return value or 0.0


@pytest.fixture
def h() -> Harness:
    return Harness()


async def test_each_route_reaches_its_handler_with_body_and_source(h: Harness) -> None:
    async with h.client() as http:
        r = await http.post("/v1/handshake/hello", content=b"hi", headers=OCTET)
        assert (r.status_code, r.content) == (200, b"server-hello:hi")
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-length"] == str(len(b"server-hello:hi"))
        assert (await http.post("/v1/handshake/finish", content=b"f", headers=OCTET)).content
        sid = "ab" * 16
        r = await http.post(f"/v1/sessions/{sid}/records", content=b"rec", headers=OCTET)
        assert r.content == b"sealed"
    assert h.calls == [
        ("admit", "192.0.2.7"),
        ("hello", b"hi"),
        ("admit", "192.0.2.7"),
        ("finish", b"f"),
        ("admit", "192.0.2.7"),
        ("record", (sid, b"rec")),
    ]
    assert h.counted("/v1/handshake/hello", 200) == 1
    assert h.counted("/v1/sessions/{session_id}/records", 200) == 1


async def test_other_paths_go_to_the_app(h: Harness) -> None:
    async with h.client() as http:
        for path in ("/healthz", "/v1/sessions/ab", "/v1/sessions/ab/records/x", "/v1/enroll"):
            assert (await http.post(path, content=b"x", headers=OCTET)).status_code == 204
    assert [c[0] for c in h.calls] == ["fallback"] * 4
    assert h.counted("/v1/handshake/hello", 200) == 0


async def test_another_method_is_405_with_allow(h: Harness) -> None:
    async with h.client() as http:
        r = await http.get("/v1/handshake/finish")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json() == {"error": "method_not_allowed", "message": "method not allowed"}
    assert h.calls == []
    assert h.counted("/v1/handshake/finish", 405) == 1


async def test_declared_length_over_the_limit_is_413_before_anything_runs(h: Harness) -> None:
    async with h.client() as http:
        r = await http.post("/v1/handshake/hello", content=b"x" * (LIMIT + 1), headers=OCTET)
    assert r.status_code == 413
    assert r.json()["error"] == "too_large"
    assert r.headers["connection"] == "close"
    assert h.calls == []  # not even the rate limit counted it


async def test_streamed_body_over_the_limit_is_413(h: Harness) -> None:
    async def chunks() -> Any:
        for _ in range(3):
            yield b"y" * 30  # no Content-Length: chunked, 90 bytes > 64

    async with h.client() as http:
        r = await http.post("/v1/handshake/hello", content=chunks(), headers=OCTET)
    assert r.status_code == 413
    assert h.calls == [("admit", "192.0.2.7")]  # the handler never saw a body


async def test_rate_limit_comes_before_the_content_type(h: Harness) -> None:
    h.refuse = RateLimited(2.4)
    async with h.client() as http:
        r = await http.post("/v1/handshake/hello", content=b"x")  # no content type either
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert h.counted("/v1/handshake/hello", 429) == 1


async def test_wrong_content_type_is_415(h: Harness) -> None:
    async with h.client() as http:
        for ct in ("application/json", "application/octet-streamx", ""):
            r = await http.post("/v1/handshake/hello", content=b"x", headers={"content-type": ct})
            assert r.status_code == 415, ct
            assert r.json()["error"] == "unsupported_media_type"
        ok = {"content-type": " Application/Octet-Stream; charset=binary"}
        assert (await http.post("/v1/handshake/hello", content=b"x", headers=ok)).is_success
    assert [c[0] for c in h.calls].count("hello") == 1


async def test_handler_errors_leave_through_the_error_table(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.fail = HandshakeFailed("signature-invalid")
    async with h.client() as http:
        r = await http.post("/v1/handshake/hello", content=b"x", headers=OCTET)
        assert r.status_code == 401
        assert r.json()["error"] == "handshake_failed"
        assert "signature" not in r.text  # fixed message per code: no reason leaks
        h.fail = RuntimeError("secret-key-material-123")
        with caplog.at_level(logging.ERROR, "qflare.server"):
            r = await http.post("/v1/handshake/hello", content=b"x", headers=OCTET)
    assert r.status_code == 500
    assert r.json() == {"error": "internal", "message": "internal error"}
    assert "secret" not in r.text
    assert any("unhandled error on /v1/handshake/hello" in m for m in caplog.messages)
    assert h.counted("/v1/handshake/hello", 401) == 1
    assert h.counted("/v1/handshake/hello", 500) == 1


async def test_a_client_that_disconnects_gets_no_answer_and_is_counted(h: Harness) -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/handshake/finish",
        "headers": [(b"content-type", b"application/octet-stream")],
        "client": ("192.0.2.7", 1),
    }
    await h.app(scope, receive, send)
    assert sent == []
    assert h.counted("/v1/handshake/finish", 499) == 1


def test_openapi_paths_document_every_route() -> None:
    paths = openapi_paths()
    assert list(paths) == [r.template for r in ROUTES]
    for route in ROUTES:
        op = paths[route.template]["post"]
        assert "application/octet-stream" in op["requestBody"]["content"]
        assert "application/octet-stream" in op["responses"]["200"]["content"]
        assert ("parameters" in op) == route.session_param
