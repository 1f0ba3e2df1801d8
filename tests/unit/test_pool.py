"""The connection pool (orders_api.pool.Pool) on stand-in connections: no database needed.

`asyncpg.connect` is replaced by an opener of numbered fake connections. A fake connection
runs three "statements": `who` returns the connection itself, `wait` holds it until an event
is set (then raises the given error, if any), `begin` leaves it inside a transaction.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from orders_api.errors import ReplicationNotConfirmed
from orders_api.pool import Pool


class FakeConnection:
    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.terminated = False
        self.in_transaction = False
        self.outcome = ""  # of the last transaction
        self.listeners: list[Callable[[Any, Any], None]] = []

    def __repr__(self) -> str:
        return f"<FakeConnection {self.number}>"

    def is_closed(self) -> bool:
        return self.closed

    def is_in_transaction(self) -> bool:
        return self.in_transaction

    def terminate(self) -> None:
        self.closed = self.terminated = True

    async def close(self, **_: Any) -> None:
        self.closed = True

    def add_log_listener(self, listener: Callable[[Any, Any], None]) -> None:
        self.listeners.append(listener)

    def transaction(self) -> FakeTransaction:
        return FakeTransaction(self)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        await asyncio.sleep(0)
        if sql == "wait":
            gate, error = args
            await gate.wait()
            if error is not None:
                raise error
        elif sql == "begin":
            self.in_transaction = True
        elif sql == "notice":  # a notice the server sent with the statement's result
            (text,) = args
            for listener in self.listeners:
                listener(self, SimpleNamespace(message=text))
        return self


class FakeTransaction:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn

    async def __aenter__(self) -> None:
        self.conn.in_transaction = True
        self.conn.outcome = "open"

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.conn.in_transaction = False
        self.conn.outcome = "commit" if exc_type is None else "rollback"


class Opener:
    """Stands in for asyncpg.connect: numbered fakes, or the exception set in `fail`; while
    `gate` is set to an unset event, connecting waits for it."""

    def __init__(self) -> None:
        self.opened: list[FakeConnection] = []
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, dsn: str, **kwargs: Any) -> FakeConnection:
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        conn = FakeConnection(len(self.opened))
        self.opened.append(conn)
        return conn


MakePool = Callable[..., tuple[Pool, Opener]]


@pytest.fixture
def make_pool(monkeypatch: pytest.MonkeyPatch) -> MakePool:
    opener = Opener()
    monkeypatch.setattr(asyncpg, "connect", opener)

    def make(
        max_size: int = 2, timeout: float = 1.0, idle_lifetime: float = 60.0
    ) -> tuple[Pool, Opener]:
        pool = Pool(
            f"test-{uuid.uuid4().hex[:8]}",  # a gauge series of its own
            "postgresql://fake/db",
            max_size=max_size,
            acquire_timeout=timeout,
            idle_lifetime=idle_lifetime,
            connect_kwargs={},
        )
        return pool, opener

    return make


def held(pool: Pool, error: BaseException | None = None) -> tuple[asyncio.Task[Any], asyncio.Event]:
    """A statement that holds a connection until the event is set (then fails with `error`)."""
    gate = asyncio.Event()
    return asyncio.create_task(pool.fetchval("wait", gate, error)), gate


def open_gate() -> asyncio.Event:
    gate = asyncio.Event()
    gate.set()
    return gate


def gauge(pool: Pool, state: str) -> float | None:
    return REGISTRY.get_sample_value(
        "orders_api_db_pool_connections", {"pool": pool.name, "state": state}
    )


# -- waiters and reuse (the logic of the former StatementPool) --------------------------------


async def test_connections_open_on_demand_and_are_reused(make_pool: MakePool) -> None:
    pool, opener = make_pool(max_size=2)
    assert opener.opened == []  # nothing at start
    first = await pool.fetchval("who")
    assert await pool.fetchval("who") is first
    assert len(opener.opened) == 1
    one, gate_one = held(pool)
    two, gate_two = held(pool)
    await asyncio.sleep(0.01)
    assert len(opener.opened) == 2
    gate_one.set()
    await one
    gate_two.set()
    await two
    assert await pool.fetchval("who") is await two  # the most recently used first (LIFO)


async def test_waiters_are_served_in_order_and_the_wait_is_bounded(make_pool: MakePool) -> None:
    pool, opener = make_pool(max_size=1, timeout=0.2)
    holder, gate = held(pool)
    first, first_gate = held(pool)
    second, second_gate = held(pool)
    await asyncio.sleep(0.01)
    gate.set()
    conn = await holder
    await asyncio.sleep(0.01)
    assert not first.done()
    assert not second.done()  # the first waiter holds it now; the second still waits
    first_gate.set()
    assert await first is conn
    await asyncio.sleep(0.01)
    assert not second.done()
    with pytest.raises(TimeoutError):
        await pool.fetchval("who")  # second holds the only connection
    second_gate.set()
    assert await second is conn
    assert len(opener.opened) == 1


async def test_a_waiter_cancelled_as_it_is_served_passes_the_connection_on(
    make_pool: MakePool,
) -> None:
    pool, opener = make_pool(max_size=1)
    conn = await pool._acquire()
    first = asyncio.create_task(pool._acquire())
    second = asyncio.create_task(pool._acquire())
    await asyncio.sleep(0.01)
    pool._release(conn, None)  # handed to the first waiter ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second is conn
    assert len(opener.opened) == 1


async def test_a_failed_connect_frees_its_slot(make_pool: MakePool) -> None:
    pool, opener = make_pool(max_size=1)
    opener.fail = OSError("connection refused")
    with pytest.raises(OSError, match="connection refused"):
        await pool.fetchval("who")
    opener.fail = None
    assert await pool.fetchval("who") is opener.opened[0]  # the slot is free again


async def test_a_connection_cut_off_mid_statement_is_closed_and_its_slot_reopened(
    make_pool: MakePool,
) -> None:
    pool, opener = make_pool(max_size=1)
    holder, _ = held(pool)
    waiter = asyncio.create_task(pool.fetchval("who"))
    await asyncio.sleep(0.01)
    holder.cancel()  # cancelled mid-protocol: the connection cannot be trusted
    with pytest.raises(asyncio.CancelledError):
        await holder
    replacement = await waiter
    assert opener.opened[0].terminated
    assert replacement is opener.opened[1]


async def test_a_connection_left_in_a_transaction_is_not_reused(make_pool: MakePool) -> None:
    pool, _ = make_pool(max_size=1)
    conn = await pool.fetchval("begin")
    assert conn.terminated
    assert await pool.fetchval("who") is not conn


async def test_an_ordinary_server_error_keeps_the_connection(make_pool: MakePool) -> None:
    pool, _ = make_pool(max_size=1)
    conn = await pool.fetchval("who")
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.fetchval("wait", open_gate(), asyncpg.UniqueViolationError("duplicate key"))
    assert not conn.terminated
    assert await pool.fetchval("who") is conn


async def test_close_fails_waiters_and_later_statements(make_pool: MakePool) -> None:
    pool, opener = make_pool(max_size=1)
    holder, gate = held(pool)
    waiter = asyncio.create_task(pool.fetchval("who"))
    await asyncio.sleep(0.01)
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError):
        await waiter
    with pytest.raises(asyncpg.InterfaceError):
        await pool.fetchval("who")
    gate.set()
    conn = await holder  # the statement in flight finishes ...
    assert conn.terminated  # ... and its connection is closed, not kept
    assert len(opener.opened) == 1


async def test_a_transaction_holds_one_connection_and_gives_it_back(make_pool: MakePool) -> None:
    pool, _ = make_pool(max_size=1)
    async with pool.transaction() as conn:
        assert conn.in_transaction
        assert gauge(pool, "in_use") == 1
        assert await conn.fetchval("who") is conn
    assert conn.outcome == "commit"
    assert gauge(pool, "in_use") == 0
    with pytest.raises(asyncpg.UniqueViolationError):  # noqa: PT012 (raised inside the block)
        async with pool.transaction() as again:
            assert again is conn
            raise asyncpg.UniqueViolationError("duplicate key")
    assert conn.outcome == "rollback"
    assert await pool.fetchval("who") is conn  # rolled back: still good


async def test_a_commit_whose_wait_for_a_standby_was_cancelled_is_not_confirmed(
    make_pool: MakePool,
) -> None:
    pool, _ = make_pool(max_size=1)
    warning = "canceling wait for synchronous replication due to user request"
    with pytest.raises(ReplicationNotConfirmed):
        await pool.fetchval("notice", warning)
    conn = await pool.fetchval("notice", "some other notice")  # only that warning counts
    assert not conn.terminated  # the session is fine: the connection is kept
    assert await pool.fetchval("who") is conn


# -- idle lifetime ------------------------------------------------------------------------


async def test_a_connection_idle_longer_than_its_lifetime_is_not_reused(
    make_pool: MakePool,
) -> None:
    pool, opener = make_pool(max_size=2, idle_lifetime=0.05)
    old = await pool.fetchval("who")
    assert await pool.fetchval("who") is old  # still fresh
    await asyncio.sleep(0.1)
    new = await pool.fetchval("who")
    assert new is not old
    assert old.terminated
    assert len(opener.opened) == 2
    assert gauge(pool, "open") == 1


async def test_the_oldest_idle_connection_ages_out_when_another_comes_back(
    make_pool: MakePool,
) -> None:
    pool, _ = make_pool(max_size=2, idle_lifetime=0.05)
    one, gate_one = held(pool)
    two, gate_two = held(pool)
    await asyncio.sleep(0.01)
    gate_one.set()
    oldest = await one
    await asyncio.sleep(0.1)
    assert not oldest.terminated  # nobody asked for a connection meanwhile
    gate_two.set()
    recent = await two
    assert oldest.terminated  # dropped as `recent` went back to the idle list
    assert not recent.terminated
    assert await pool.fetchval("who") is recent


# -- expire_all -----------------------------------------------------------------------------


async def test_expire_all_closes_idle_connections_now_and_busy_ones_on_release(
    make_pool: MakePool,
) -> None:
    pool, opener = make_pool(max_size=3)
    holder, gate = held(pool)
    await asyncio.sleep(0.01)
    idle = await pool.fetchval("who")
    busy = opener.opened[0]
    assert idle is opener.opened[1]
    assert (gauge(pool, "open"), gauge(pool, "in_use")) == (2, 1)

    pool.expire_all()
    assert idle.terminated  # at once
    assert not busy.terminated  # its statement is still running
    assert gauge(pool, "open") == 1
    gate.set()
    assert await holder is busy
    assert busy.terminated  # closed as it came back
    assert (gauge(pool, "open"), gauge(pool, "in_use")) == (0, 0)

    fresh = await pool.fetchval("who")
    assert fresh is opener.opened[2]  # new connections are opened after
    assert not fresh.terminated
    assert await pool.fetchval("who") is fresh  # and reused as usual


async def test_expire_all_drops_a_connection_that_was_being_opened(make_pool: MakePool) -> None:
    """A connection whose connect began before expire_all may lead to the old server: it
    serves the statement that waited for it, then it is closed."""
    pool, opener = make_pool(max_size=1)
    opener.gate = asyncio.Event()
    statement = asyncio.create_task(pool.fetchval("who"))
    await asyncio.sleep(0.01)
    pool.expire_all()
    opener.gate.set()
    conn = await statement
    assert conn.terminated
    assert await pool.fetchval("who") is not conn


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        ConnectionResetError("connection reset by peer"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only transaction"),
    ],
    ids=["lost", "shutdown", "reset", "read-only"],
)
async def test_a_lost_connection_or_a_read_only_server_expires_every_connection(
    make_pool: MakePool, error: BaseException
) -> None:
    pool, opener = make_pool(max_size=2)
    failing, gate = held(pool, error)
    await asyncio.sleep(0.01)
    idle = await pool.fetchval("who")
    gate.set()
    with pytest.raises(type(error)):
        await failing
    assert opener.opened[0].terminated
    assert idle.terminated  # another connection to the same server: dropped too
    assert gauge(pool, "open") == 0
    assert await pool.fetchval("who") is opener.opened[2]


async def test_an_ordinary_error_expires_nothing_else(make_pool: MakePool) -> None:
    pool, _ = make_pool(max_size=2)
    failing, gate = held(pool, asyncpg.UniqueViolationError("duplicate key"))
    await asyncio.sleep(0.01)
    idle = await pool.fetchval("who")
    gate.set()
    with pytest.raises(asyncpg.UniqueViolationError):
        await failing
    assert not idle.terminated
    assert gauge(pool, "open") == 2


# -- gauges -------------------------------------------------------------------------------


async def test_each_pool_has_its_own_gauges(make_pool: MakePool) -> None:
    api, _ = make_pool(max_size=2)
    relay, _ = make_pool(max_size=2)
    holder, gate = held(api)
    await asyncio.sleep(0.01)
    await api.fetchval("who")
    assert (gauge(api, "open"), gauge(api, "in_use")) == (2, 1)
    assert (gauge(relay, "open"), gauge(relay, "in_use")) == (0, 0)
    gate.set()
    await holder
    assert (gauge(api, "open"), gauge(api, "in_use")) == (2, 0)
    await api.close()
    assert gauge(api, "open") == 0
