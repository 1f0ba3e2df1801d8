"""A real `orders-api serve --workers 2` process on the session's database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live import LiveServer, running_server


@pytest.fixture(scope="session")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`orders-api serve --workers 2`, as the README starts it, with DATABASE_URL set."""
    with running_server(database_url, tmp_path_factory.mktemp("e2e-server")) as live:
        yield live
