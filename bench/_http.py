"""Servers in subprocesses for the HTTP benches, and how their CPU time is read (bench-only).

Run as a script this module *is* the server::

    python bench/_http.py qflare --data-dir DIR [--database-url URL] --port P
                                 [--loop auto|asyncio|uvloop] [--http auto|h11|httptools]
                                 [--log-level info|warning]
    python bench/_http.py tls --cert PEM --key PEM [--ca PEM] --port P
    python bench/_http.py floor --port P --answers N,N [--loop ...] [--http ...]

It prints ``READY`` on stdout once it accepts connections, then answers one command per line
read from stdin: ``cpu`` -> the process's CPU time in ns; ``stats`` -> a JSON object;
``quit`` -> exit.

**How server CPU is measured.** ``cpu`` answers ``time.process_time_ns()`` taken inside the
server: ``CLOCK_PROCESS_CPUTIME_ID``, user + system time of every thread of the process (the
uvicorn thread, the SQLite store's database thread, threads that have ended), in nanoseconds. The
control thread blocks on stdin between commands, so it costs nothing while a batch runs; the
bench reads ``cpu`` before and after each batch. Both sides (QFLARE and TLS) are read the same
way. ``ServerProcess.proc_stat_ns`` reads ``/proc/<pid>/stat`` utime + stime (10 ms ticks) as
a cross-check from outside.

The work PostgreSQL's backends do for the QFLARE server happens in other processes:
``PgBackends`` finds the backends serving the server's connections (the server's TCP sockets
to the database's port, matched to ``pg_stat_activity.client_port``) and sums their
``/proc/<pid>/schedstat`` run time (ns) so that figure can be reported beside the server's.

**The QFLARE server** is ``create_app(settings)`` on uvicorn through ``serve_in_thread``, with
``qflare serve``'s logging (INFO to stderr, which the bench sends to a log file) unless
``--log-level warning``. Its settings differ from the defaults only where a bench must: the
per-source rate limit (every bench device comes from 127.0.0.1) and the maintenance interval
(a cleanup pass landing inside one batch would be noise, not handshake cost). The security
monitor runs with its default rules.

**The floor server** is uvicorn alone, through the same ``serve_in_thread`` and loop/parser
choice as the QFLARE server, in front of a bare ASGI app that reads each POST's body and
answers the next of ``--answers`` byte counts (the sizes of a real ServerHello and finish
answer). What it costs per connection of two such requests is what HTTP costs a handshake
before any QFLARE code runs.

**The TLS server** is Python's ``ssl`` module: a blocking accept loop that, per connection,
completes a TLS 1.3 handshake (``wrap_socket``), reads the client's few bytes, answers two
and closes. X25519 only (``set_ecdh_curve``), ECDSA P-256 certificates, no session tickets
(``num_tickets = 0`` and ``OP_NO_TICKET``), so every connection is a full handshake. With
``--ca`` it requires and verifies a client certificate (mutual TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import ipaddress
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HERE = Path(__file__).resolve()
DEFAULT_PG_URL = os.environ.get(
    "QFLARE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
# Overrides of the defaults in every bench server (see the module docstring).
BENCH_SETTINGS: dict[str, Any] = {
    "rate_limit_per_second": 1e6,
    "rate_limit_burst": 1_000_000,
    "cleanup_interval": 86_400,
}


# --- the server side -----------------------------------------------------------------------------


def _control(stats: Callable[[], dict[str, Any]]) -> None:
    """Answer the parent's commands on stdin until ``quit`` or end of input."""
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    for line in sys.stdin:
        command = line.strip()
        if command == "cpu":
            answer = str(time.process_time_ns())
        elif command == "stats":
            answer = json.dumps(stats())
        elif command == "quit":
            break
        else:
            answer = "?"
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


def _serve_qflare(args: argparse.Namespace) -> None:
    from qflare.config import Settings  # noqa: PLC0415 (only the server process needs them)
    from qflare.server.app import create_app  # noqa: PLC0415
    from qflare.server.background import serve_in_thread  # noqa: PLC0415

    if args.log_level == "info":  # what ``qflare serve`` configures (server.app.serve)
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
    settings = Settings(
        data_dir=Path(args.data_dir),
        database_url=args.database_url or "",
        port=args.port,
        **BENCH_SETTINGS,
    )
    app = create_app(settings)
    with serve_in_thread(app, port=args.port, loop=args.loop, http=args.http):
        _control(lambda: {"pid": os.getpid()})


def _serve_floor(args: argparse.Namespace) -> None:
    from qflare.server.background import serve_in_thread  # noqa: PLC0415

    answers = [b"\0" * int(n) for n in args.answers.split(",")]
    served = {"requests": 0}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:  # read the whole body, as the real routes do
            message = await receive()
            more = message.get("more_body", False)
        body = answers[served["requests"] % len(answers)]
        served["requests"] += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    with serve_in_thread(app, port=args.port, loop=args.loop, http=args.http):  # type: ignore[arg-type]
        _control(lambda: dict(served))


def _serve_tls(args: argparse.Namespace) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_ecdh_curve("X25519")
    ctx.num_tickets = 0  # TLS 1.3: send no NewSessionTicket, so no resumption is possible
    ctx.options |= ssl.OP_NO_TICKET
    mutual = args.ca is not None
    if mutual:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(args.ca)
    sock = socket.create_server(("127.0.0.1", args.port), backlog=256)
    counts = {"handshakes": 0, "errors": 0, "last_error": ""}

    def loop() -> None:
        while True:
            conn, _ = sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn does
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:  # the full handshake
                    if mutual and not tls.getpeercert():
                        raise ssl.SSLError("no client certificate")
                    tls.recv(64)
                    tls.sendall(b"ok")
                counts["handshakes"] += 1
            except (OSError, ssl.SSLError) as exc:
                counts["errors"] += 1
                counts["last_error"] = repr(exc)[:200]

    threading.Thread(target=loop, name="tls-server", daemon=True).start()
    _control(lambda: dict(counts))


def server_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/_http.py")
    sub = parser.add_subparsers(dest="kind", required=True)
    q = sub.add_parser("qflare")
    q.add_argument("--data-dir", required=True)
    q.add_argument("--database-url", default="")
    q.add_argument("--port", type=int, required=True)
    q.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    q.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"))
    q.add_argument("--log-level", default="info", choices=("info", "warning"))
    f = sub.add_parser("floor")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--answers", required=True)
    f.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    f.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"))
    t = sub.add_parser("tls")
    t.add_argument("--cert", required=True)
    t.add_argument("--key", required=True)
    t.add_argument("--ca", default=None)
    t.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    {"qflare": _serve_qflare, "floor": _serve_floor, "tls": _serve_tls}[args.kind](args)


# --- the parent side: processes ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server subprocess (this file run as a script) and its control pipe."""

    def __init__(
        self,
        argv: list[str],
        *,
        label: str,
        log: Path,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> None:
        self.label = label
        self.log_path = log
        self._log: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        self.pid = self.proc.pid
        self._expect("READY", timeout)

    def _expect(self, word: str, timeout: float) -> None:
        assert self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not result or result[0].strip() != word:
            self.close()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{self.label} server did not start:\n{tail}")

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{self.label} server died:\n{tail}")
        return answer.strip()

    def cpu_ns(self) -> int:
        """The server's own CPU time so far (every thread, user + system), in ns."""
        return int(self.ask("cpu"))

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.ask("stats"))
        return doc

    def proc_stat_ns(self) -> int:
        """utime + stime from /proc/<pid>/stat (tick resolution): the outside cross-check."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired, AssertionError):
                self.proc.kill()  # our own child, by its handle
                self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()


# --- PostgreSQL: schemas and backend CPU ---------------------------------------------------------


def pg_owner_dsn(url: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("schema", "role")]
    return urlunsplit(parts._replace(query=urlencode(query)))


def pg_schema_url(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("schema", schema)])))


def new_schema_name(tag: str) -> str:
    return f"qflare_bench_{tag}_{uuid.uuid4().hex[:10]}"


def drop_schemas(url: str, schemas: list[str]) -> None:
    import asyncpg  # noqa: PLC0415

    async def drop() -> None:
        conn = await asyncpg.connect(pg_owner_dsn(url))
        try:
            for schema in schemas:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    if schemas:
        asyncio.run(drop())


def _socket_ports(pid: int, remote_port: int) -> set[int]:
    """Local ports of ``pid``'s TCP sockets connected to ``remote_port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes and int(f[2].rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def _schedstat_ns(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class PgBackends:
    """The PostgreSQL backends serving one server process, and their CPU time."""

    url: str
    server_pid: int
    pids: list[int] = field(default_factory=list)

    def refresh(self) -> None:
        import asyncpg  # noqa: PLC0415

        port = urlsplit(self.url).port or 5432
        ports = sorted(_socket_ports(self.server_pid, port))

        async def query() -> list[int]:
            conn = await asyncpg.connect(pg_owner_dsn(self.url))
            try:
                rows = await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[])", ports
                )
            finally:
                await conn.close()
            return [int(r["pid"]) for r in rows]

        self.pids = asyncio.run(query()) if ports else []

    def snapshot(self) -> dict[int, int]:
        out = {}
        for pid in self.pids:
            ns = _schedstat_ns(pid)
            if ns is not None:
                out[pid] = ns
        return out

    @staticmethod
    def spent(before: dict[int, int], after: dict[int, int]) -> int:
        return sum(ns - before.get(pid, ns) for pid, ns in after.items())


# --- QFLARE: a server with enrolled devices ------------------------------------------------------


@dataclass
class QflareServer:
    """A QFLARE server subprocess over a fresh store, and devices enrolled through its API."""

    label: str
    server: ServerProcess
    url: str
    identities: list[Any]
    database_url: str
    pg: PgBackends | None = None
    next_device: int = 0
    # (request, answer) body sizes of the last handshake's two exchanges (the floor's shape).
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def identity(self) -> Any:
        """The devices take turns (a fleet's handshakes are rekeys of enrolled devices)."""
        ident = self.identities[self.next_device % len(self.identities)]
        self.next_device += 1
        return ident


async def _prepare_store(settings: Any) -> str:
    from qflare.runtime import init_data_dir, issue_admin_token, open_manager  # noqa: PLC0415

    await init_data_dir(settings)
    manager = await open_manager(settings)
    try:
        token, _ = await issue_admin_token(
            manager, name="bench", scopes=("enroll",), now=time.time()
        )
    finally:
        await manager.store.close()
    return token


def start_qflare(
    *,
    label: str,
    workdir: Path,
    database_url: str = "",
    devices: int,
    loop: str = "auto",
    http_impl: str = "auto",
    log_level: str = "info",
    env: dict[str, str] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> QflareServer:
    """Initialise a store, start the server subprocess, enroll ``devices`` devices over HTTP."""
    import httpx  # noqa: PLC0415

    from qflare.client import DeviceClient  # noqa: PLC0415
    from qflare.config import Settings  # noqa: PLC0415

    data_dir = workdir / label
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings = Settings(data_dir=data_dir, database_url=database_url, port=port, **BENCH_SETTINGS)
    admin_token = asyncio.run(_prepare_store(settings))
    argv = ["qflare", "--data-dir", str(data_dir), "--port", str(port)]
    argv += ["--loop", loop, "--http", http_impl, "--log-level", log_level]
    if database_url:
        argv += ["--database-url", database_url]
    server = ServerProcess(argv, label=label, log=workdir / f"{label}.log", env=env)
    url = f"http://127.0.0.1:{port}"
    identities = []
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
    ) as admin:
        for i in range(devices):
            r = admin.post("/v1/admin/tokens", json={"ttl_seconds": 600})
            r.raise_for_status()
            client = DeviceClient.enroll(url, r.json()["token"], f"bench-{i:04d}")
            identities.append(client.identity)
            client.close()
            if (i + 1) % 16 == 0:
                progress(f"{label}: enrolled {i + 1}/{devices} devices")
    pg = PgBackends(database_url, server.pid) if database_url else None
    return QflareServer(label, server, url, identities, database_url, pg)


def drive_flow(
    conn: http.client.HTTPConnection, flow: Any, sizes: list[tuple[int, int]] | None = None
) -> Any:
    """Run a client flow (``qflare.client.flow``) over one ``http.client`` connection; with
    ``sizes``, record each exchange's (request body, answer body) byte counts in it."""
    from qflare.client.flow import Response  # noqa: PLC0415

    request = next(flow)
    if sizes is not None:
        sizes.clear()
    while True:
        conn.request(
            request.method,
            request.path,
            body=request.body,
            headers={"content-type": request.content_type},
        )
        r = conn.getresponse()
        body = r.read()
        if sizes is not None:
            sizes.append((len(request.body), len(body)))
        try:
            request = flow.send(Response(r.status, body))
        except StopIteration as stop:
            return stop.value


def http_connection(url: str) -> http.client.HTTPConnection:
    """A connected ``http.client`` connection with Nagle off (uvicorn's side has it off too;
    with it on, a request written in two pieces waits for a delayed ACK)."""
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(url).port, timeout=30)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def qflare_handshake(server: QflareServer, conn: http.client.HTTPConnection | None = None) -> Any:
    """One complete handshake (hello + finish) of the next device; a fresh TCP connection
    unless ``conn`` is given. Raises if the server refused or the session does not check."""
    from qflare import crypto  # noqa: PLC0415
    from qflare.client.flow import connect_flow  # noqa: PLC0415

    flow = connect_flow(server.identity(), clock=time.time, rng=crypto.system_rng)
    if conn is not None:
        return drive_flow(conn, flow, server.sizes)
    fresh = http_connection(server.url)
    try:
        return drive_flow(fresh, flow, server.sizes)
    finally:
        fresh.close()


@dataclass
class FloorServer:
    """uvicorn alone (see the module docstring), and the two request bodies it is sent."""

    server: ServerProcess
    url: str
    requests: list[bytes]


def start_floor(
    *, workdir: Path, sizes: list[tuple[int, int]], loop: str = "auto", http_impl: str = "auto"
) -> FloorServer:
    """A floor server shaped like a handshake of ``sizes`` ((request, answer) byte counts)."""
    port = free_port()
    argv = ["floor", "--port", str(port), "--loop", loop, "--http", http_impl]
    argv += ["--answers", ",".join(str(answer) for _, answer in sizes)]
    server = ServerProcess(argv, label="http-floor", log=workdir / "http-floor.log")
    requests = [os.urandom(request) for request, _ in sizes]
    return FloorServer(server, f"http://127.0.0.1:{port}", requests)


def http_floor(floor: FloorServer) -> None:
    """What HTTP costs one handshake: the same requests (sizes, method, content type) on a new
    TCP connection to uvicorn with nothing behind it."""
    conn = http_connection(floor.url)
    try:
        for body in floor.requests:
            conn.request(
                "POST",
                "/v1/handshake",
                body=body,
                headers={"content-type": "application/octet-stream"},
            )
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"http-floor answered {r.status}")
    finally:
        conn.close()


# --- TLS: certificates, server, client -----------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(where: Path) -> Certs:
    """A CA and a server and a client certificate, all ECDSA P-256 / SHA-256 (pyca)."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("qflare bench CA"))
        .issuer_name(name("qflare bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = leaf("bench-device-0001", ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    certs = Certs(
        where / "ca.pem",
        where / "server.pem",
        where / "server.key",
        where / "client.pem",
        where / "client.key",
    )
    certs.ca.write_bytes(ca.public_bytes(pem))
    certs.server_cert.write_bytes(server_cert.public_bytes(pem))
    write_key(server_key, certs.server_key)
    certs.client_cert.write_bytes(client_cert.public_bytes(pem))
    write_key(client_key, certs.client_key)
    return certs


@dataclass
class TlsServer:
    label: str
    server: ServerProcess
    port: int
    client: ssl.SSLContext
    mutual: bool


def start_tls(*, label: str, workdir: Path, certs: Certs, mutual: bool) -> TlsServer:
    port = free_port()
    argv = ["tls", "--cert", str(certs.server_cert), "--key", str(certs.server_key)]
    argv += ["--port", str(port)]
    if mutual:
        argv += ["--ca", str(certs.ca)]
    server = ServerProcess(argv, label=label, log=workdir / f"{label}.log")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ecdh_curve("X25519")
    ctx.load_verify_locations(certs.ca)
    if mutual:
        ctx.load_cert_chain(certs.client_cert, certs.client_key)
    return TlsServer(label, server, port, ctx, mutual)


def tls_handshake(server: TlsServer) -> None:
    """One full TLS 1.3 handshake on a new TCP connection (no session offered), a few bytes
    each way, close. Raises if the handshake or the exchange fails."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = server.client.wrap_socket(raw, server_hostname="localhost")
        try:
            if tls.version() != "TLSv1.3" or tls.session_reused:
                raise SystemExit(f"{server.label}: not a full TLS 1.3 handshake")
            tls.sendall(b"hi")
            if tls.recv(8) != b"ok":
                raise SystemExit(f"{server.label}: no answer after the handshake")
        finally:
            tls.close()


def speedups_env(path: str | None) -> dict[str, str] | None:
    """The environment for a server that should import uvloop/httptools from ``path``."""
    if not path:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH", "")) if p)
    return env


def machine_summary() -> dict[str, str]:
    """CPU model, cores, Python, OpenSSL (ssl module) and pyca/cryptography versions."""
    import platform  # noqa: PLC0415

    import cryptography  # noqa: PLC0415
    from cryptography.hazmat.backends.openssl.backend import backend  # noqa: PLC0415

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "ssl_openssl": ssl.OPENSSL_VERSION,
        "cryptography": cryptography.__version__,
        "cryptography_openssl": backend.openssl_version_text(),
    }


if __name__ == "__main__":
    server_main()
