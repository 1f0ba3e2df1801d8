"""Fixtures: every API test runs on SQLite and, when TEST_DATABASE_URL is set, on PostgreSQL.

TEST_DATABASE_URL names a PostgreSQL server (any database on it that we may connect to);
the session creates its own fresh database there, migrates it with Alembic and drops it at
the end. When the variable is set and the server cannot be reached, tests fail: they never
skip. Isolation between tests comes from a fresh tenant id per test.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from orders_api.app import create_app
from orders_api.migrations import upgrade
from tests.helpers import FakeClock, make_settings

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "")
BACKENDS = ["sqlite", "postgresql"] if TEST_DATABASE_URL else ["sqlite"]


def _pg_url(database: str) -> str:
    url = make_url(TEST_DATABASE_URL).set(drivername="postgresql", database=database)
    return url.render_as_string(hide_password=False)


async def _admin(sql: str) -> None:
    admin = make_url(TEST_DATABASE_URL).set(drivername="postgresql")
    conn = await asyncpg.connect(admin.render_as_string(hide_password=False))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One migrated database per backend for the whole session."""
    urls = {"sqlite": f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'orders.db'}"}
    pg_database = f"orders_test_{uuid.uuid4().hex[:12]}"
    if TEST_DATABASE_URL:
        asyncio.run(_admin(f'CREATE DATABASE "{pg_database}"'))
        urls["postgresql"] = _pg_url(pg_database)
    for url in urls.values():
        upgrade(url)
    yield urls
    if TEST_DATABASE_URL:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{pg_database}" WITH (FORCE)'))


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def database_url(backend: str, database_urls: dict[str, str]) -> str:
    return database_urls[backend]


@pytest.fixture(scope="session")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _reset_clock(clock: FakeClock) -> Iterator[None]:
    clock.offset = timedelta()
    yield
    clock.offset = timedelta()


@pytest.fixture(scope="session")
async def app(database_url: str, clock: FakeClock) -> AsyncIterator[FastAPI]:
    application = create_app(make_settings(database_url), clock=clock)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def engine(app: FastAPI) -> AsyncEngine:
    engine: AsyncEngine = app.state.engine
    return engine


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"
