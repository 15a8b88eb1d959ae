"""The PostgreSQL store's connection pool: a stack of idle asyncpg connections.

asyncpg's ``Pool`` spends nearly as much event-loop CPU on ``acquire()`` and release as
``Connection.fetch`` spends on a one-row query (35-40 us against 48-52 us, measured: see
docs/STORAGE.md); its release runs ``asyncio.shield`` and a timeout context, a new task and an
extra loop iteration per operation. This pool does no I/O and creates no task on the common
path:

* ``acquire()`` pops the most recently released idle connection (a stack: under light load the
  same few are reused and the rest stay idle until they are closed), or opens one while fewer
  than ``max_size`` are open, or else waits on a future in a FIFO queue.
* ``release(conn, exc)`` is a plain function. A connection that comes back clean (no
  exception, or a server error after which the connection reported its state, and not inside a
  transaction) goes to the first waiter, or onto the stack. A waiter is handed the connection
  itself, so a newcomer cannot take it first and no waiter starves.
* A connection that comes back closed, or with an error that says the connection is gone
  (``PostgresConnectionError``, ``OSError``, an ``InterfaceError`` other than an argument that
  could not be encoded) is terminated and its place freed: the next acquisition opens a new one.
* Any other return (a task cancelled mid-statement, a timeout, an exception raised inside a
  transaction) goes through a repair task the pool owns, which the cancelled caller cannot
  interrupt: it waits for a cancelled statement to finish (a ``SELECT 1``, which asyncpg
  sends only after the cancellation is acknowledged, and whose reply carries the server's
  transaction status), sends ``ROLLBACK`` if a transaction is open, and releases the
  connection again; if that fails the connection is terminated. Until then the connection
  counts as in use.
* A task cancelled while it waits leaves the queue; one cancelled after it was handed a
  connection (or a place to open one) passes it on.
* Connections left idle for a whole ``idle_timeout`` period beyond ``min_size`` are terminated
  (asyncpg closed idle connections after 300 s as well).
* ``close()`` fails the waiters, closes idle connections (``Terminate`` message), waits up to
  ``close_timeout`` for the connections in use to come back and closes them as they do, then
  terminates the rest; their callers get ``StoreUnavailable``. ``acquire()`` after ``close()``
  raises ``StoreUnavailable``.

The pool resets no session state: see ``postgres.py`` for why there is none to reset.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg

from qflare.errors import StoreUnavailable

# Probe and rollback sent by the repair task (simple protocol, no prepared statement).
_PROBE: Final = "SELECT 1"
_ROLLBACK: Final = "ROLLBACK"


def _broken(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the connection itself is unusable."""
    if exc is None:
        return False
    if isinstance(exc, asyncpg.InterfaceError):
        return not isinstance(exc, ValueError)  # ValueError: an argument asyncpg cannot encode
    return isinstance(exc, asyncpg.PostgresConnectionError | OSError)


class ConnectionPool:
    """At most ``max_size`` connections made by ``connect``; see the module docstring."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        *,
        min_size: int,
        max_size: int,
        idle_timeout: float = 300.0,
        close_timeout: float = 5.0,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        self._connect = connect
        self._min, self._max = min_size, max_size
        self._idle_timeout, self._close_timeout = idle_timeout, close_timeout
        self._idle: list[Any] = []  # a stack: the last released is the next acquired
        # Futures of waiting acquisitions: each gets a connection, or None (a place to open one).
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._all: set[Any] = set()  # every open connection, idle or not
        self._size = 0  # connections open or being opened
        self._low = 0  # the idle stack's lowest depth since the last idle check
        self._repairs: set[asyncio.Task[None]] = set()
        self._closing = False
        self._changed: asyncio.Future[None] | None = None  # close() waits on it
        self._timer: asyncio.TimerHandle | None = None

    @property
    def size(self) -> int:
        """Connections open or being opened."""
        return self._size

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def open(self) -> None:
        """Open ``min_size`` connections, one after the other; none stay open if one fails."""
        try:
            while self._size < self._min:
                conn = await self._connect()
                self._idle.append(conn)
                self._all.add(conn)
                self._size = self._low = len(self._idle)
        except BaseException:
            for conn in self._idle:
                conn.terminate()
            self._idle.clear()
            self._all.clear()
            self._size = self._low = 0
            raise
        if self._idle_timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(self._idle_timeout, self._reap)

    async def acquire(self) -> Any:
        """A connection for the caller alone, until it passes it to ``release``."""
        if self._closing:
            raise StoreUnavailable("store is closed")
        idle = self._idle
        while idle:
            conn = idle.pop()
            self._low = min(self._low, len(idle))
            if not conn.is_closed():
                return conn
            self._discard(conn)
        if self._size < self._max:
            self._size += 1
            return await self._open_in_place()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            conn = await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed a connection or a place just as the caller was cancelled: pass it on.
                self._give_back(fut.result())
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise
        if conn is None:
            return await self._open_in_place()
        if conn.is_closed():  # died between the hand-over and now: replace it in its place
            self._all.discard(conn)
            conn.terminate()
            return await self._open_in_place()
        return conn

    def connection(self) -> _Lease:
        """``async with pool.connection() as conn``: acquire, then release with what the body
        raised."""
        return _Lease(self)

    def release(self, conn: Any, exc: BaseException | None = None) -> None:
        """Take back ``conn``; ``exc`` is what the caller's use of it raised, if anything."""
        if conn.is_closed() or _broken(exc):
            self._discard(conn)
        elif conn.is_in_transaction() or not (
            exc is None or isinstance(exc, asyncpg.PostgresError)
        ):
            task = asyncio.get_running_loop().create_task(self._repair(conn))
            self._repairs.add(task)
            task.add_done_callback(self._repairs.discard)
        else:
            self._give_back(conn)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(StoreUnavailable("store is closed"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout
        try:
            while True:
                idle, self._idle = self._idle, []
                for conn in idle:
                    self._all.discard(conn)
                self._size -= len(idle)
                await asyncio.gather(*(_close(conn) for conn in idle))
                remaining = deadline - loop.time()
                if self._size == 0 or remaining <= 0:
                    break
                if self._idle:  # returned while the others were closing
                    continue
                self._changed = changed = loop.create_future()
                await asyncio.wait([changed], timeout=remaining)
        finally:
            self._changed = None
            for conn in list(self._all):  # still in use after the grace period
                conn.terminate()

    # -- internals --------------------------------------------------------------------------

    async def _open_in_place(self) -> Any:
        """Open a connection in a place already counted in ``_size``."""
        try:
            conn = await self._connect()
        except BaseException:
            self._free_place()
            raise
        if self._closing:
            conn.terminate()
            self._free_place()
            raise StoreUnavailable("store is closed")
        self._all.add(conn)
        return conn

    def _give_back(self, conn: Any | None) -> None:
        """A clean connection (or, for None, a free place) to the first waiter, else idle."""
        if conn is None:
            self._free_place()
            return
        if not self._closing:
            while self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(conn)
                    return
        self._idle.append(conn)
        self._notify_close()

    def _discard(self, conn: Any) -> None:
        self._all.discard(conn)
        conn.terminate()
        self._free_place()

    def _free_place(self) -> None:
        self._size -= 1
        while self._waiters and not self._closing:
            fut = self._waiters.popleft()
            if not fut.done():
                self._size += 1
                fut.set_result(None)
                return
        self._notify_close()

    def _notify_close(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    async def _repair(self, conn: Any) -> None:
        try:
            if not conn.is_in_transaction():
                # Cancelled mid-statement (BEGIN included) the status may be stale: asyncpg
                # sends this only once the cancellation is acknowledged.
                await conn.execute(_PROBE)
            if conn.is_in_transaction():
                await conn.execute(_ROLLBACK)
        except asyncio.CancelledError:  # the loop is shutting down
            self._discard(conn)
            raise
        except Exception:
            self._discard(conn)
            return
        if conn.is_closed() or conn.is_in_transaction():
            self._discard(conn)
        else:
            self._give_back(conn)

    def _reap(self) -> None:
        """Terminate connections that stayed idle for the whole last period, down to min."""
        self._timer = None
        if self._closing:
            return
        stale = min(self._low, self._size - self._min)
        if stale > 0:
            for conn in self._idle[:stale]:
                self._discard(conn)
            del self._idle[:stale]
        self._low = len(self._idle)
        self._timer = asyncio.get_running_loop().call_later(self._idle_timeout, self._reap)


class _Lease:
    """``acquire`` on entry, ``release`` on exit (a class: cheaper than a generator)."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._conn: Any = None

    async def __aenter__(self) -> Any:
        self._conn = await self._pool.acquire()
        return self._conn

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        self._pool.release(self._conn, exc)


async def _close(conn: Any) -> None:
    """Close with a ``Terminate`` message; a connection that cannot is terminated."""
    try:
        await conn.close(timeout=2)
    except Exception:
        conn.terminate()
    except BaseException:
        conn.terminate()
        raise
