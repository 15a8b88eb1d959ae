"""A real uvicorn server in a background thread: for ``qflare demo``, the end-to-end tests and
the HTTP benches.

``loop`` and ``http`` pick uvicorn's event loop and HTTP parser. The default ``"auto"`` is
uvicorn's own choice: uvloop and httptools when they are importable, else asyncio and h11.
``speedups()`` tells which of the two are importable here; docs/PERFORMANCE.md has what they
change.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import uvicorn

LoopName = Literal["auto", "asyncio", "uvloop"]
HttpName = Literal["auto", "h11", "httptools"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def speedups() -> dict[str, bool]:
    """Which of uvicorn's optional speedups (uvloop, httptools) can be imported here."""
    return {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools")}


@contextmanager
def serve_in_thread(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int,
    timeout: float = 30,
    loop: LoopName = "auto",
    http: HttpName = "auto",
) -> Iterator[str]:
    """Start ``app`` on ``host:port``, yield its base URL, stop it on exit.

    Asking for ``loop="uvloop"`` or ``http="httptools"`` where it is not installed fails here
    (``RuntimeError``), before a thread starts: a bench must not measure the fallback silently.
    """
    wanted = [name for name in (loop, http) if name in ("uvloop", "httptools")]
    missing = [name for name in wanted if not speedups()[name]]
    if missing:
        raise RuntimeError(f"not installed: {', '.join(missing)}")
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on", loop=loop, http=http
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="qflare-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start within {timeout} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
