"""The asyncpg connection pool of the PostgreSQL hot path, on stand-in connections."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from orders_api.orders.pg import Lease, StatementPool


class FakeConnection:
    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.terminated = False
        self.in_transaction = False

    def is_closed(self) -> bool:
        return self.closed

    def is_in_transaction(self) -> bool:
        return self.in_transaction

    def terminate(self) -> None:
        self.closed = self.terminated = True

    async def close(self) -> None:
        self.closed = True


class Opener:
    """connect() for the pool: numbered stand-ins, or the exception set in `fail`."""

    def __init__(self) -> None:
        self.opened: list[FakeConnection] = []
        self.fail: BaseException | None = None

    async def __call__(self) -> FakeConnection:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        conn = FakeConnection(len(self.opened))
        self.opened.append(conn)
        return conn


def make_pool(max_size: int = 2, timeout: float = 1.0) -> tuple[StatementPool, Opener]:
    opener = Opener()
    return StatementPool(opener, max_size, timeout), opener  # type: ignore[arg-type]


async def test_connections_open_on_demand_and_are_reused() -> None:
    pool, opener = make_pool(max_size=2)
    assert opener.opened == []  # nothing at start
    first = await pool.acquire()
    pool.release(first)
    assert await pool.acquire() is first
    second = await pool.acquire()
    assert second is not first
    assert len(opener.opened) == 2
    pool.release(first)
    pool.release(second)
    assert await pool.acquire() is second  # the most recently used first (LIFO)


async def test_waiters_are_served_in_order_and_the_wait_is_bounded() -> None:
    pool, opener = make_pool(max_size=1, timeout=0.2)
    conn = await pool.acquire()
    first = asyncio.create_task(pool.acquire())
    second = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    pool.release(conn)
    assert await first is conn
    assert not second.done()
    pool.release(conn)
    assert await second is conn
    with pytest.raises(TimeoutError):
        await pool.acquire()
    assert len(opener.opened) == 1


async def test_a_broken_connection_is_closed_and_its_slot_reopened() -> None:
    pool, opener = make_pool(max_size=1)
    conn = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    pool.release(conn, broken=True)
    replacement = await waiter
    assert conn.terminated
    assert replacement is not conn
    assert len(opener.opened) == 2


async def test_a_connection_left_in_a_transaction_is_not_reused() -> None:
    pool, _ = make_pool(max_size=1)
    conn = await pool.acquire()
    conn.in_transaction = True
    pool.release(conn)
    assert conn.terminated
    assert await pool.acquire() is not conn


async def test_a_failed_connect_frees_its_slot() -> None:
    pool, opener = make_pool(max_size=1)
    opener.fail = OSError("connection refused")
    with pytest.raises(OSError, match="connection refused"):
        await pool.acquire()
    opener.fail = None
    conn = await pool.acquire()  # the slot is free again
    assert conn is opener.opened[0]


async def test_a_waiter_cancelled_as_it_is_served_passes_the_connection_on() -> None:
    pool, opener = make_pool(max_size=1)
    conn = await pool.acquire()
    first = asyncio.create_task(pool.acquire())
    second = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    pool.release(conn)  # handed to the first waiter ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second is conn
    assert len(opener.opened) == 1


async def _fail_in_lease(pool: StatementPool, error: BaseException) -> FakeConnection:
    """Run a 'statement' that fails with `error` on a leased connection; the connection."""
    leased: list[FakeConnection] = []

    async def statement() -> None:
        async with Lease(pool) as conn:
            leased.append(conn)
            raise error

    with pytest.raises(type(error)):
        await statement()
    return leased[0]


async def test_lease_keeps_the_connection_after_a_server_error_only() -> None:
    pool, _ = make_pool(max_size=1)
    conn = await _fail_in_lease(pool, asyncpg.UniqueViolationError("duplicate key"))
    assert not conn.terminated
    same = await _fail_in_lease(pool, asyncpg.AdminShutdownError("terminating connection"))
    assert same is conn
    assert conn.terminated  # the session ended: never reused
    other = await _fail_in_lease(pool, asyncio.CancelledError())  # cut off mid-protocol
    assert other is not conn
    assert other.terminated


async def test_close_fails_waiters_and_later_acquires() -> None:
    pool, _ = make_pool(max_size=1)
    conn = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError):
        await waiter
    with pytest.raises(asyncpg.InterfaceError):
        await pool.acquire()
    pool.release(conn)
    assert conn.terminated
