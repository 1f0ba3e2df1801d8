"""The asyncpg connection pool that every database statement of the API and the relay runs on.

`fetch*` take a connection, run one statement in autocommit and give it back; `transaction()`
holds one for a short transaction. Idle connections wait in a LIFO and are opened on demand up
to `max_size` (none at start-up); a caller waits for a connection at most `acquire_timeout`
seconds, then gets TimeoutError (503). A connection is closed rather than reused when:
- its statement failed other than with an ordinary server error (timeout, cancellation, lost
  connection, server shutdown): it may be mid-protocol;
- it sat idle longer than `idle_lifetime` (the server, a proxy or a firewall may have
  forgotten it);
- it belongs to an earlier generation: `expire_all()` drops every connection at once, and runs
  by itself when a connection is lost or the server turns out to be read-only (a demoted
  primary), so that after a failover no statement goes to the old primary and new
  connections look for the new one (`target_session_attrs=read-write` in DATABASE_URL).
A statement whose commit ended with PostgreSQL's warning that the wait for the synchronous
standby was cancelled raises ReplicationNotConfirmed (503): that commit is visible here but a
failover may lose it, so it must not be acknowledged.
Nothing needs resetting between uses: statements set no session state. Behind PgBouncer in
transaction mode statements are unnamed (asyncpg's statement cache off) and no setting is sent
at connect; the timeouts are then the role's (README).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from opentelemetry.trace import SpanKind, Tracer
from prometheus_client import Gauge

from orders_api.config import Settings
from orders_api.db import parse_database_url
from orders_api.errors import ReplicationNotConfirmed

CONNECTIONS = Gauge(
    "orders_api_db_pool_connections",
    "Database connections of a pool: open, and checked out (in_use)",
    ["pool", "state"],
    multiprocess_mode="livesum",
)

# Errors after which the connection's session is over, and with it very likely every other
# connection to that server (shutdown, crash, failover): drop them all.
_SESSION_ENDING = (
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    OSError,
)
_READ_ONLY_TRANSACTION = "25006"  # a write reached a standby: the primary moved
# The WARNINGs of a commit whose wait for a synchronous standby was cancelled (syncrep.c).
_SYNC_WAIT_CANCELLED = (
    "canceling wait for synchronous replication",
    "canceling the wait for synchronous replication",
)


def _ends_server(exc: BaseException) -> bool:
    """A lost connection, a server going away, or a write refused by a standby. A timeout
    (an OSError too) is not: a slow statement says nothing about the other connections."""
    if isinstance(exc, TimeoutError):
        return False
    return (
        isinstance(exc, _SESSION_ENDING) or getattr(exc, "sqlstate", None) == _READ_ONLY_TRANSACTION
    )


class Pool:
    def __init__(
        self,
        name: str,
        dsn: str,
        *,
        max_size: int,
        acquire_timeout: float,
        idle_lifetime: float,
        connect_kwargs: dict[str, Any],
    ) -> None:
        self.name = name
        self._dsn = dsn
        self._connect_kwargs = connect_kwargs
        self._max_size = max_size
        self._timeout = acquire_timeout
        self._idle_lifetime = idle_lifetime
        self._size = 0  # open connections plus connections being opened
        self._idle: deque[tuple[asyncpg.Connection, float]] = deque()  # (conn, idle since)
        self._generation = 0
        self._born: dict[asyncpg.Connection, int] = {}  # connection -> its generation
        self._unconfirmed: set[asyncpg.Connection] = set()  # its last commit may be lost
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._closed = False
        self.tracer: Tracer | None = None  # set when tracing is on: a span per statement
        self._open_gauge = CONNECTIONS.labels(name, "open")
        self._in_use_gauge = CONNECTIONS.labels(name, "in_use")

    @classmethod
    def from_settings(cls, name: str, settings: Settings, *, max_size: int | None = None) -> Pool:
        """The pool for DATABASE_URL with the configured timeouts."""
        database = parse_database_url(settings.database_url)
        # The server's statement_timeout answers first; this client-side bound also covers
        # what it does not: a commit waiting for a synchronous standby.
        statement_timeout = settings.db_statement_timeout_ms / 1000
        command_timeout = statement_timeout + min(5.0, statement_timeout)
        connect_kwargs: dict[str, Any] = {
            "command_timeout": command_timeout,
            "timeout": settings.db_connect_timeout_seconds,
        }
        if database.pgbouncer:
            connect_kwargs["statement_cache_size"] = 0
            connect_kwargs["server_settings"] = {"application_name": f"orders-api-{name}"}
        else:
            connect_kwargs["server_settings"] = {
                "statement_timeout": str(settings.db_statement_timeout_ms),
                "lock_timeout": str(settings.db_lock_timeout_ms),
                "idle_in_transaction_session_timeout": "60000",
                "application_name": f"orders-api-{name}",
            }
        return cls(
            name,
            database.dsn,
            max_size=max_size or settings.db_pool_size,
            acquire_timeout=command_timeout,
            idle_lifetime=settings.db_idle_lifetime_seconds,
            connect_kwargs=connect_kwargs,
        )

    async def connect(self) -> asyncpg.Connection:
        """A connection outside the pool with the pool's settings (the caller closes it)."""
        return await asyncpg.connect(self._dsn, **self._connect_kwargs)

    # -- statements ---------------------------------------------------------------------

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        rows: list[Any] = await self._run("fetch", sql, args)
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._run("fetchrow", sql, args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._run("fetchval", sql, args)

    async def execute(self, sql: str, *args: Any) -> str:
        status: str = await self._run("execute", sql, args)
        return status

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside a transaction that commits when the block ends without error."""
        conn = await self._acquire()
        failure: BaseException | None = None
        try:
            async with conn.transaction():
                yield conn
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._release(conn, failure)

    async def _run(self, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        if self.tracer is None:
            return await self._call(method, sql, args)
        with self.tracer.start_as_current_span(
            sql.split(None, 1)[0],
            kind=SpanKind.CLIENT,
            attributes={"db.system": "postgresql", "db.statement": sql},
        ):
            return await self._call(method, sql, args)

    async def _call(self, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        conn = await self._acquire()
        try:
            result = await getattr(conn, method)(sql, *args)
            if self._unconfirmed and conn in self._unconfirmed:
                self._unconfirmed.discard(conn)
                raise ReplicationNotConfirmed()
        except BaseException as exc:
            self._release(conn, exc)
            raise
        self._release(conn, None)
        return result

    def _on_notice(self, conn: asyncpg.Connection, message: Any) -> None:
        """Runs before the statement's result is handed back (both are scheduled in order)."""
        if str(getattr(message, "message", "")).startswith(_SYNC_WAIT_CANCELLED):
            self._unconfirmed.add(conn)

    # -- connections --------------------------------------------------------------------

    async def _acquire(self) -> asyncpg.Connection:
        if self._closed:
            raise asyncpg.InterfaceError("pool is closed")
        conn = self._take_idle()
        if conn is None:
            if self._size < self._max_size:
                self._size += 1
                conn = await self._open()
            else:
                conn = await self._wait()
        self._in_use_gauge.inc()
        return conn

    def _take_idle(self) -> asyncpg.Connection | None:
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if not conn.is_closed() and now - since <= self._idle_lifetime:
                return conn
            self._discard(conn)
        return None

    async def _wait(self) -> asyncpg.Connection:
        waiter: asyncio.Future[asyncpg.Connection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout):
                conn = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()  # handed over just as we gave up: pass it on
                if handed is None:
                    self._size -= 1
                    self._hand_over(None)
                else:
                    self._hand_over(handed)
            else:
                waiter.cancel()
            raise
        return conn if conn is not None else await self._open()

    async def _open(self) -> asyncpg.Connection:
        """Open a connection on a slot already counted in _size."""
        generation = self._generation  # an expire_all() while connecting drops it too
        try:
            conn = await asyncpg.connect(self._dsn, **self._connect_kwargs)
        except BaseException:
            self._size -= 1
            self._hand_over(None)
            raise
        conn.add_log_listener(self._on_notice)
        self._born[conn] = generation
        self._open_gauge.inc()
        return conn

    def _release(self, conn: asyncpg.Connection, failure: BaseException | None) -> None:
        self._in_use_gauge.dec()
        if failure is not None and _ends_server(failure):
            self.expire_all()
        # An ordinary server error leaves the connection usable; anything else may leave it
        # mid-protocol.
        broken = failure is not None and (
            not isinstance(failure, asyncpg.PostgresError | ReplicationNotConfirmed)
            or _ends_server(failure)
        )
        if (
            broken
            or self._closed
            or conn.is_closed()
            or conn.is_in_transaction()
            or self._born.get(conn) != self._generation
        ):
            self._discard(conn)
            self._hand_over(None)
            return
        self._hand_over(conn)
        self._expire_oldest_idle()

    def _discard(self, conn: asyncpg.Connection) -> None:
        """Close a connection and free its slot (the caller hands the slot over)."""
        conn.terminate()
        self._born.pop(conn, None)
        self._unconfirmed.discard(conn)
        self._size -= 1
        self._open_gauge.dec()

    def _hand_over(self, conn: asyncpg.Connection | None) -> None:
        """To the longest waiter (None: a free slot it opens itself), else back to idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                if conn is None:
                    if self._closed:
                        waiter.set_exception(asyncpg.InterfaceError("pool is closed"))
                        continue
                    self._size += 1
                waiter.set_result(conn)
                return
        if conn is not None:
            self._idle.append((conn, time.monotonic()))

    def _expire_oldest_idle(self) -> None:
        """The LIFO reuses the newest: the oldest idle ones are the ones that age out."""
        deadline = time.monotonic() - self._idle_lifetime
        while self._idle and self._idle[0][1] < deadline:
            conn, _ = self._idle.popleft()
            self._discard(conn)

    def expire_all(self) -> None:
        """Drop every connection: idle ones now, the ones in use when they come back."""
        self._generation += 1
        while self._idle:
            conn, _ = self._idle.pop()
            self._discard(conn)

    async def ping(self, within: float) -> None:
        """One round trip on a pooled connection (readiness)."""
        async with asyncio.timeout(within):
            await self.fetchval("SELECT 1")

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            conn, _ = self._idle.pop()
            self._born.pop(conn, None)
            self._size -= 1
            self._open_gauge.dec()
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(asyncpg.InterfaceError("pool is closed"))
