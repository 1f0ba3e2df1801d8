"""One private PostgreSQL for the fault tests that need one (started on first use)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.private_postgres import PrivatePostgres, private_postgres
from tests.live import migrate


@pytest.fixture(scope="session")
def postgres() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        migrate(server.url())
        yield server
