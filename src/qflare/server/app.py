"""The HTTP API (FastAPI on uvicorn): device routes, admin routes, health, metrics.

Routes only parse and answer; ``Service`` does the work. Every error leaves through one table
(``errors.ERRORS``) as ``{"error": code, "message": text}`` with a fixed message per code; a
request body over the limit is cut off at ``max_body_bytes`` while it streams in.
See docs/API.md for every route, status and code.

No ``from __future__ import annotations`` here: FastAPI reads the route signatures at run time,
and they name dependencies local to ``create_app``.
"""

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qflare import __version__
from qflare.config import Settings
from qflare.errors import NotFound, QflareError, StoreUnavailable
from qflare.fl.aggregator import Aggregator
from qflare.keys import EnrollmentRequest, KeyManager
from qflare.keys.manager import utc
from qflare.monitor.audit import AuditLog
from qflare.monitor.events import EventType
from qflare.monitor.runtime import Monitor, open_monitor
from qflare.monitor.shared import SharedUnavailable
from qflare.runtime import admin_token_hash, open_manager, retire_due_keys, server_policy
from qflare.server.audit_routes import add_audit_routes
from qflare.server.binary_routes import BinaryRoutes, openapi_paths
from qflare.server.errors import (
    Forbidden,
    HttpError,
    RateLimited,
    Unauthorized,
    spec_for,
    spec_for_status,
)
from qflare.server.metrics import Metrics
from qflare.server.nonces import RedisNonceCache
from qflare.server.ratelimit import RateLimiter, SourceBlocked, SourceGate, Throttle
from qflare.server.service import Service, parse_session_id
from qflare.store import DeviceState, KeyPurpose
from qflare.store.validate import identifier as check_identifier

log = logging.getLogger("qflare.server")


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


# -- request counting -----------------------------------------------------------------------------


class RequestCounter:
    """Count requests by route template and status: a plain ASGI middleware (Starlette's
    ``@app.middleware("http")`` costs a task group and a response wrapper per request)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            # The router records the matched route in the scope it was given.
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()


# -- request size ---------------------------------------------------------------------------------


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while streaming.

    A streamed body that runs over is cut off where it crosses the limit. Whatever the app
    then does with the cut (an error inside a task group, a framework's own 400 for a body it
    could not read) the client gets the 413: the app's own answer is dropped unsent.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _too_large(send)
                return
        seen, exceeded, answered, started = 0, False, False, False

        async def limited() -> Message:
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded(message: Message) -> None:
            nonlocal answered, started
            if exceeded and not started:
                if not answered:
                    answered = True
                    await _too_large(send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:  # an ExceptionGroup too, when a task group carried the cut
            if not exceeded or started:
                raise
        if exceeded and not answered and not started:
            await _too_large(send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send) -> None:
    response = _error_response(HttpError(413, "too_large", "request body too large"))
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(response.body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def _error_response(exc: BaseException) -> JSONResponse:
    spec = spec_for(exc)
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(
        {"error": spec.code, "message": spec.message}, status_code=spec.status, headers=headers
    )


# -- request bodies -------------------------------------------------------------------------------


class EnrollBody(BaseModel):
    token: str = Field(max_length=256)
    device_id: str = Field(max_length=256)
    algorithm: str = Field(max_length=64)
    public_key: str = Field(max_length=8192, description="base64 of the identity public key")
    proof: str = Field(max_length=16384, description="base64 ML-DSA signature, docs/KEYS.md")


class TokenBody(BaseModel):
    ttl_seconds: int | None = Field(default=None, gt=0, le=365 * 86400)


class ReasonBody(BaseModel):
    reason: str = Field(default="operator", max_length=200)


class RotateBody(BaseModel):
    purpose: KeyPurpose = KeyPurpose.KEM_STATIC
    overlap_seconds: int | None = Field(default=None, ge=0, le=365 * 86400)


def _unb64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "malformed", f"{what} is not valid base64") from None


_CT = re.compile(r"^\s*([^;\s]+)")


def _require_type(request: Request, expected: str) -> None:
    match = _CT.match(request.headers.get("content-type", ""))
    if match is None or match.group(1).lower() != expected:
        raise HttpError(415, "unsupported_media_type", f"send {expected}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _device_json(device: Any) -> dict[str, Any]:
    return {
        "device_id": device.device_id,
        "state": device.state.value,
        "state_reason": device.state_reason,
        "created_at": device.created_at.isoformat(),
        "last_seen": device.last_seen.isoformat() if device.last_seen else None,
        "failure_count": device.failure_count,
    }


def _session_json(s: Any) -> dict[str, Any]:
    return {
        "session_id": s.session_id.hex(),
        "device_id": s.device_id,
        "state": s.state.value,
        "suite": s.suite,
        "epoch": s.epoch,
        "created_at": s.created_at.isoformat(),
        "expires_at": s.expires_at.isoformat(),
        "counters": asdict(s.counters),
    }


def _key_json(k: Any) -> dict[str, Any]:
    return {
        "key_id": k.key_id,
        "purpose": k.purpose.value,
        "algorithm": k.algorithm,
        "version": k.version,
        "state": k.state.value,
        "created_at": k.created_at.isoformat(),
        "retire_after": k.retire_after.isoformat() if k.retire_after else None,
        "public_key": base64.b64encode(k.public_key).decode() if k.public_key else None,
    }


# -- the app --------------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    *,
    aggregator: Aggregator | None = None,
    clock: Callable[[], float] = time.time,
    maintenance: bool = True,
) -> FastAPI:
    """The ASGI app. The store opens in the lifespan; ``app.state.service`` is the service."""
    metrics = Metrics()
    limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    blocked_events = Throttle()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = await open_manager(settings)
        cache = RedisNonceCache(settings.redis_url) if settings.redis_url else None
        monitor = open_monitor(settings, manager)  # detection rules, blocks (docs/MONITOR.md)
        app.state.monitor = monitor
        app.state.gate = SourceGate(limiter, monitor.blocks, monitor.shared, clock=clock)
        service = Service(
            manager,
            server_policy(settings),
            metrics=metrics,
            nonce_cache=cache,
            aggregator=aggregator,
            clock=clock,
            monitor=monitor.detector,
            audit=AuditLog.for_keys(manager, clock=clock, origin=settings.audit_origin),
        )
        await manager.handshake_keys(now=clock())  # fail at start-up, not on the first device
        app.state.service = service
        task = asyncio.create_task(_maintain(service, settings)) if maintenance else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Queued INFO events are stored before the store closes (docs/MONITOR.md).
            await service.flush_events()
            if cache is not None:
                await cache.close()
            await monitor.close()
            await manager.store.close()

    app = FastAPI(
        title="QFLARE",
        version=__version__,
        summary="Post-quantum key exchange and key management for federated-learning fleets",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    framework_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's spec with the binary routes, which it does not serve, after enroll."""
        spec = app.openapi_schema
        if spec is None:
            spec = framework_openapi()  # cached by FastAPI; completed here, once
            paths = list(spec["paths"].items())
            at = next((i + 1 for i, (p, _) in enumerate(paths) if p == "/v1/enroll"), 0)
            spec["paths"] = dict(paths[:at] + list(openapi_paths().items()) + paths[at:])
        return spec

    app.openapi = openapi  # type: ignore[method-assign]

    def service_of(request: Request) -> Service:
        service: Service = request.app.state.service
        return service

    def source_of(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    async def admit(source: str) -> None:
        """The source's rate limit and blocks; the refusal is a security event."""
        gate: SourceGate = app.state.gate
        try:
            await gate.check(source)
        except SourceBlocked as exc:
            if blocked_events.due(source, time.monotonic()):
                await app.state.service.event(
                    EventType.RATE_LIMITED, source=source, reason="blocked", rule=exc.rule
                )
            raise
        except RateLimited:
            await app.state.service.event(EventType.RATE_LIMITED, source=source)
            raise

    async def rate_limited(request: Request) -> None:
        await admit(source_of(request))

    @app.exception_handler(QflareError)
    async def _qflare_error(request: Request, exc: QflareError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        with contextlib.suppress(AttributeError):
            await service_of(request).event(
                EventType.BAD_REQUEST, source=source_of(request), route=request.url.path[:100]
            )
        return _error_response(HttpError(400, "invalid_request", "request body is invalid"))

    @app.exception_handler(StarletteHTTPException)
    async def _framework(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        spec = spec_for_status(exc.status_code)
        return JSONResponse(
            {"error": spec.code, "message": spec.message},
            status_code=spec.status,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error_response(exc)

    # Added first, so it runs inside the request counter below (which then counts the 413s).
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    app.add_middleware(RequestCounter, metrics=metrics)
    # Outermost: the binary device routes never reach the framework (binary_routes.py).
    app.add_middleware(
        BinaryRoutes,
        limit=settings.max_body_bytes,
        metrics=metrics,
        admit=admit,
        hello=lambda data, source: app.state.service.hello(data, source=source),
        finish=lambda data, source: app.state.service.finish(data, source=source),
        record=lambda sid, data, source: app.state.service.record(sid, data, source=source),
        error_response=_error_response,
    )

    # -- device API ------------------------------------------------------------------------------

    @app.post(
        "/v1/enroll",
        tags=["device"],
        dependencies=[Depends(rate_limited)],
        openapi_extra=_json_body(EnrollBody),
    )
    async def enroll(request: Request) -> dict[str, Any]:
        """Enroll a device with a one-time token and proof of possession of its ML-DSA key."""
        # Read by hand, not as a parameter: FastAPI would parse the body before the rate limit
        # and the content-type check ran.
        _require_type(request, "application/json")
        try:
            body = EnrollBody.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        service = service_of(request)
        try:
            public_key, proof = _unb64(body.public_key, "public_key"), _unb64(body.proof, "proof")
        except HttpError:
            await service.enrollment_failed(body.device_id, source_of(request), "malformed")
            raise
        enrollment = EnrollmentRequest(
            token=body.token,
            device_id=body.device_id,
            algorithm=body.algorithm,
            public_key=public_key,
            proof=proof,
        )
        return await service.enroll(enrollment, source=source_of(request))

    @app.get("/v1/sessions/{session_id}", tags=["device"], dependencies=[Depends(rate_limited)])
    async def session_status(session_id: str, request: Request) -> dict[str, Any]:
        """State, epoch and expiry of a session (no secrets)."""
        return asdict(await service_of(request).session_info(session_id))

    add_audit_routes(app, dependencies=[Depends(rate_limited)])  # docs/AUDIT.md

    # -- health and metrics ----------------------------------------------------------------------

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> dict[str, str]:
        """The store answers and the key ring loads; 503 otherwise."""
        service = service_of(request)
        try:
            await service.keys.store.audit_size()
            await service.keys.handshake_keys(now=clock())
        except QflareError as exc:
            raise StoreUnavailable("not ready") from exc
        if service.nonce_cache is not None and not await service.nonce_cache.ping():
            raise StoreUnavailable("redis not ready")
        return {"status": "ready"}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics of this replica."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- admin API -------------------------------------------------------------------------------

    def require(scope: str) -> Callable[[Request], Awaitable[str]]:
        async def check(request: Request) -> str:
            service = service_of(request)
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            try:
                if scheme.lower() != "bearer" or not token or len(token) > 256:
                    raise Unauthorized("missing admin token")
                try:
                    record = await service.keys.store.get_admin_token(admin_token_hash(token))
                except NotFound:
                    raise Unauthorized("unknown admin token") from None
                if record.revoked:
                    raise Unauthorized("revoked admin token")
            except Unauthorized:
                await service.event(EventType.ADMIN_AUTH_FAILED, source=source_of(request))
                raise
            if scope not in record.scopes:
                await service.event(
                    EventType.ADMIN_AUTH_FAILED, source=source_of(request), scope=scope
                )
                raise Forbidden(scope)
            return record.name

        return check

    async def audit(request: Request, who: str, action: str, **detail: str) -> None:
        await service_of(request).event(
            EventType.ADMIN_ACTION, source=source_of(request), admin=who, action=action, **detail
        )

    Reader = Annotated[str, Depends(require("read"))]

    @app.post("/v1/admin/tokens", tags=["admin"])
    async def issue_token(
        request: Request,
        who: Annotated[str, Depends(require("enroll"))],
        body: TokenBody | None = None,
    ) -> dict[str, str]:
        """Issue a one-time enrollment token (shown once; only its hash is stored)."""
        ttl = body.ttl_seconds if body is not None else None
        async with service_of(request).audit.operation("token.issue", actor=who) as intent:
            issued = await service_of(request).keys.issue_token(now=clock(), ttl=ttl)
            intent.result["token_id"] = issued.token_id
        await audit(request, who, "token.issue", token_id=issued.token_id)
        return {
            "token_id": issued.token_id,
            "token": issued.token,
            "expires_at": issued.expires_at.isoformat(),
        }

    @app.get("/v1/admin/devices", tags=["admin"])
    async def list_devices(
        request: Request,
        _: Reader,
        state: DeviceState | None = None,
        after: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        """Devices ordered by id; page with ``after``."""
        keys = service_of(request).keys
        devices = await keys.store.list_devices(keys.tenant, state=state, after=after, limit=limit)
        return [_device_json(d) for d in devices]

    @app.get("/v1/admin/devices/{device_id}", tags=["admin"])
    async def show_device(device_id: str, request: Request, _: Reader) -> dict[str, Any]:
        """One device with its key versions and sessions."""
        keys = service_of(request).keys
        device = await keys.device(device_id)
        versions = await keys.store.list_device_keys(keys.tenant, device.device_id)
        return {
            **_device_json(device),
            "keys": [
                {"version": k.version, "algorithm": k.algorithm, "state": k.state.value}
                for k in versions
            ],
            "sessions": [_session_json(s) for s in await keys.device_sessions(device_id)],
        }

    @app.post("/v1/admin/devices/{device_id}/{action}", tags=["admin"])
    async def device_action(
        device_id: str,
        action: str,
        request: Request,
        who: Annotated[str, Depends(require("devices"))],
        body: ReasonBody | None = None,
    ) -> dict[str, Any]:
        """``quarantine``, ``reinstate`` or ``revoke`` a device (revoking also ends its
        sessions; quarantine ends them too and can be undone with reinstate)."""
        keys: KeyManager = service_of(request).keys
        reason = (body or ReasonBody()).reason
        if action not in ("quarantine", "reinstate", "revoke"):
            raise HttpError(404, "not_found", "not found")
        audited = service_of(request).audit.operation(
            f"device.{action}", device_id=check_identifier(device_id, "device id"), actor=who
        )
        async with audited:  # fail closed: no audit entry, no change (docs/AUDIT.md)
            if action == "quarantine":
                device = await keys.quarantine(device_id, reason=reason, now=clock())
                event = EventType.DEVICE_QUARANTINED
            elif action == "reinstate":
                device = await keys.reinstate(device_id, reason=reason)
                event = EventType.DEVICE_REINSTATED
                detector = monitor_of(request).detector
                if detector is not None:  # its next burst is counted from zero
                    await detector.forgive(device_id=device.device_id, now=clock())
            else:
                device, _ = await keys.revoke_device(device_id, reason=reason, now=clock())
                event = EventType.DEVICE_REVOKED
        await service_of(request).event(event, device_id=device.device_id, admin=who)
        return _device_json(device)

    @app.get("/v1/admin/keys", tags=["admin"])
    async def list_keys(request: Request, _: Reader) -> list[dict[str, Any]]:
        """The server key ring (public parts only)."""
        return [_key_json(k) for k in await service_of(request).keys.server_keys()]

    @app.post("/v1/admin/keys/rotate", tags=["admin"])
    async def rotate_key(
        request: Request,
        who: Annotated[str, Depends(require("keys"))],
        body: RotateBody | None = None,
    ) -> dict[str, Any]:
        """Rotate a key; the previous one keeps working for the overlap window."""
        body = body or RotateBody()
        audited = service_of(request).audit.operation(
            "key.rotate", purpose=body.purpose.value, actor=who
        )
        async with audited as intent:
            rotation = await service_of(request).keys.rotate_server_key(
                body.purpose, now=clock(), overlap=body.overlap_seconds
            )
            intent.result["key_id"] = rotation.active.key_id
        metrics.key_rotations.labels(body.purpose.value).inc()
        await service_of(request).event(
            EventType.KEY_ROTATED, admin=who, key_id=rotation.active.key_id
        )
        return {
            "active": _key_json(rotation.active),
            "previous": _key_json(rotation.previous) if rotation.previous else None,
        }

    @app.get("/v1/admin/devices/{device_id}/sessions", tags=["admin"])
    async def list_sessions(device_id: str, request: Request, _: Reader) -> list[dict[str, Any]]:
        """A device's sessions, oldest first."""
        return [_session_json(s) for s in await service_of(request).keys.device_sessions(device_id)]

    @app.post("/v1/admin/sessions/{session_id}/revoke", tags=["admin"])
    async def revoke_session(
        session_id: str, request: Request, who: Annotated[str, Depends(require("sessions"))]
    ) -> dict[str, Any]:
        """Revoke one session; the device's next record is refused (410 session_closed)."""
        service = service_of(request)
        sid = parse_session_id(session_id)
        async with service.audit.operation("session.revoke", session_id=sid.hex(), actor=who):
            record = await service.keys.revoke_session(sid, now=clock())
        await service.event(EventType.SESSION_REVOKED, device_id=record.device_id, admin=who)
        return _session_json(record)

    def monitor_of(request: Request) -> Monitor:
        monitor: Monitor = request.app.state.monitor
        return monitor

    @app.get("/v1/admin/sources/blocked", tags=["admin"])
    async def blocked_sources(request: Request, _: Reader) -> list[dict[str, Any]]:
        """Sources blocked by a detection rule, with the rule and the end of the block."""
        try:
            blocks = await monitor_of(request).blocks.list(clock())
        except SharedUnavailable:
            raise StoreUnavailable("redis unavailable") from None
        return [
            {"source": b.source, "rule": b.rule, "until": utc(b.until).isoformat()} for b in blocks
        ]

    @app.post("/v1/admin/sources/{source}/unblock", tags=["admin"])
    async def unblock_source(
        source: Annotated[str, Path(max_length=64)],
        request: Request,
        who: Annotated[str, Depends(require("devices"))],
    ) -> dict[str, Any]:
        """Lift a detection rule's block of a source (on every replica, through Redis)."""
        monitor = monitor_of(request)
        try:
            removed = await monitor.blocks.unblock(source)
        except SharedUnavailable:
            raise StoreUnavailable("redis unavailable") from None
        if monitor.detector is not None:
            await monitor.detector.forgive(source=source, now=clock())
        if removed:
            await service_of(request).event(EventType.SOURCE_UNBLOCKED, source=source, admin=who)
        return {"source": source, "unblocked": removed}

    @app.get("/v1/admin/monitor/rules", tags=["admin"])
    async def monitor_rules(request: Request, _: Reader) -> dict[str, Any]:
        """The detection rules in force, and whether their windows are shared (Redis)."""
        monitor = monitor_of(request)
        detector = monitor.detector
        return {
            "enabled": detector is not None,
            "shared": monitor.shared is not None,
            "respond": detector.respond if detector is not None else False,
            "block_seconds": detector.block_seconds if detector is not None else None,
            "rules": detector.describe() if detector is not None else [],
        }

    @app.get("/v1/admin/events", tags=["admin"])
    async def list_events(
        request: Request,
        _: Reader,
        device_id: Annotated[str | None, Query(max_length=64)] = None,
        after_id: Annotated[int | None, Query(ge=0)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        """Security events, oldest first; page with ``after_id``."""
        service = service_of(request)
        await service.flush_events()  # this replica's queued INFO events are listed too
        keys = service.keys
        events = await keys.store.list_security_events(
            keys.tenant, device_id=device_id, after_id=after_id, limit=limit
        )
        return [_jsonable(asdict(e)) for e in events]

    return app


async def _maintain(service: Service, settings: Settings) -> None:
    """The periodic task: delete expired rows in small batches, retire keys whose overlap
    ended, rotate the static key when it is older than ``key_rotation_days``."""
    keys = service.keys
    while True:
        await asyncio.sleep(settings.cleanup_interval)
        now = service.clock()
        try:
            counts = await keys.store.cleanup(utc(now))
            if counts.total:
                log.info("cleanup removed %s", counts)
            # Fail closed, as every key change: no key.retire entry, no retirement.
            for key in await retire_due_keys(keys, service.audit, now=now, actor="schedule"):
                await service.event(EventType.KEY_RETIRED, key_id=key.key_id)
            active = await keys.store.get_active_server_key(keys.tenant, KeyPurpose.KEM_STATIC)
            age = now - (active.activated_at or active.created_at).timestamp()
            if age > settings.key_rotation_days * 86400:
                audited = service.audit.operation(
                    "key.rotate", purpose=KeyPurpose.KEM_STATIC.value, actor="schedule"
                )
                async with audited as intent:
                    rotation = await keys.rotate_server_key(
                        KeyPurpose.KEM_STATIC, now=now, if_active=active.key_id
                    )
                    intent.result["key_id"] = rotation.active.key_id
                await service.event(EventType.KEY_ROTATED, key_id=rotation.active.key_id)
        except QflareError:
            log.exception("maintenance step failed; retrying next interval")
        try:  # periodic checkpoints: one whenever the audit log grew since the last
            await service.audit.checkpoint_if_grown(now=now)
        except QflareError:
            log.exception("audit checkpoint failed; retrying next interval")


def serve(settings: Settings) -> None:
    """Run the server with uvicorn until interrupted (``qflare serve``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    aggregator = (
        Aggregator(features=settings.fl_features, min_updates=settings.fl_min_updates)
        if settings.fl_min_updates
        else None
    )
    uvicorn.run(
        create_app(settings, aggregator=aggregator),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
    )
