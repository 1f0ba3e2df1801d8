"""Fixtures of the relay tests: a database of their own per module, the API, a private broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from orders_api.db import create_engine
from tests.helpers import make_settings
from tests.integration.relay_support import (
    NatsServer,
    create_relay_database,
    empty_tables,
    orders_api,
)


@pytest.fixture(scope="module")
def relay_database(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url, drop = create_relay_database(backend, tmp_path_factory.mktemp(f"relay-{backend}"))
    yield url
    drop()


@pytest.fixture
async def db(relay_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(make_settings(relay_database))
    await empty_tables(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def api(relay_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async with orders_api(relay_database) as client:
        yield client


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path)
    server.start()
    yield server
    server.stop()
