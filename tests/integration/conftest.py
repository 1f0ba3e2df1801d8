"""Fixtures of the relay tests: a database of their own per module, the API, a private broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from orders_api.pool import Pool
from tests.helpers import make_settings
from tests.integration.relay_support import NatsServer, empty_tables, orders_api


@pytest.fixture(scope="module")
def relay_database(fresh_database: Callable[[], str]) -> str:
    """The relays drain whole tables: their tests get a database of their own."""
    return fresh_database()


@pytest.fixture
async def pool(relay_database: str) -> AsyncIterator[Pool]:
    """A pool on the relay database, as the relay builds it, with the tables emptied."""
    pool = Pool.from_settings("relay-test", make_settings(relay_database), max_size=4)
    await empty_tables(pool)
    yield pool
    await pool.close()


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
