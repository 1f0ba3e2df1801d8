"""Fixtures: every test runs on a real PostgreSQL, migrated by Alembic.

The server is TEST_DATABASE_URL when set (CI sets it; any database on it that we may connect
to), else the embedded PostgreSQL in .data/test-pg, started for the session. The session makes
its own fresh database there, migrates it and drops it at the end; a server that cannot be
reached fails the run (it never skips). Isolation between tests comes from a fresh tenant id
per test; tests that need their own database (purge, relay) make one with `fresh_database`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from orders_api import embedded
from orders_api.app import create_app
from orders_api.migrations import upgrade
from tests.helpers import (
    PROJECT_ROOT,
    FakeClock,
    free_port,
    make_settings,
    server_address,
    with_database,
)

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "")
EMBEDDED_TEST_DIR = PROJECT_ROOT / ".data" / "test-pg"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server for the session: TEST_DATABASE_URL, or the embedded one."""
    if TEST_DATABASE_URL:
        yield TEST_DATABASE_URL
        return
    with embedded.running(EMBEDDED_TEST_DIR) as url:
        yield url


async def _admin(server: str, sql: str) -> None:
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


FreshDatabase = Callable[[], str]


@pytest.fixture(scope="session")
def fresh_database(server_url: str) -> Iterator[FreshDatabase]:
    """Makes a new migrated database on the test server (dropped at the end): its URL."""
    made: list[str] = []

    def make() -> str:
        name = f"orders_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
        made.append(name)
        url = with_database(server_url, name)
        upgrade(url)
        return url

    yield make
    for name in made:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def database_url(fresh_database: FreshDatabase) -> str:
    """The session's migrated database."""
    return fresh_database()


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """Direct access to the session's database, for reading rows back."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _reset_clock(clock: FakeClock) -> Iterator[None]:
    clock.offset = timedelta()
    yield
    clock.offset = timedelta()


@pytest.fixture(scope="session")
def app_database_url(database_url: str) -> Iterator[str]:
    """What the application under test is given: the session's database, or with
    TEST_VIA_PGBOUNCER=1 the same database through a PgBouncer 1.18 in transaction mode
    (`?pgbouncer=true`), so the whole API tier runs through it (`make test-pgbouncer`)."""
    if not os.environ.get("TEST_VIA_PGBOUNCER"):
        yield database_url
        return
    from chaos.bouncer import PgBouncer

    host, port, name = server_address(database_url)
    root = Path(tempfile.mkdtemp(prefix="orders-test-pgbouncer-"))
    root.chmod(0o755)
    bouncer = PgBouncer(root, root / "logs", free_port(), "orders-tests")
    bouncer.start(host, port, name)
    try:
        yield bouncer.dsn(name) + "?pgbouncer=true"
    finally:
        bouncer.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
async def app(app_database_url: str, clock: FakeClock) -> AsyncIterator[ASGIApp]:
    """The application with its lifespan running, as a server would run it."""
    application = create_app(make_settings(app_database_url), clock=clock)
    async with LifespanManager(application) as manager:
        yield manager.app


@pytest.fixture
async def client(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tiers by folder: unit and api are the fast tier; e2e, faults, fuzz and the rest are
    marked so that `-m fast` or `-m "not fast"` picks one side."""
    slow = {"e2e", "faults", "fuzz", "hardening", "integration", "embedded", "contract"}
    for item in items:
        parts = Path(str(item.fspath)).relative_to(PROJECT_ROOT / "tests").parts
        folder = parts[0] if len(parts) > 1 else ""
        if folder in slow:
            item.add_marker(getattr(pytest.mark, folder))
        else:
            item.add_marker(pytest.mark.fast)
