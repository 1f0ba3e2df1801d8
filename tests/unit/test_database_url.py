"""DATABASE_URL: what the service runs on, and what it refuses with a clear message."""

from __future__ import annotations

import pytest

from orders_api.db import Database, DatabaseUrlError, parse_database_url, redacted


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", Database("postgresql://u@h/db", pgbouncer=False)),
        ("postgres://u@h:5433/db", Database("postgresql://u@h:5433/db", pgbouncer=False)),
        ("postgresql+asyncpg://u@h/db", Database("postgresql://u@h/db", pgbouncer=False)),
        (
            "postgresql://u@h1:1,h2:2/db?target_session_attrs=read-write",
            Database("postgresql://u@h1:1,h2:2/db?target_session_attrs=read-write", False),
        ),
        (
            "postgresql://u@h/db?sslmode=disable&pgbouncer=true",
            Database("postgresql://u@h/db?sslmode=disable", pgbouncer=True),
        ),
        ("postgresql://u@h/db?pgbouncer=false", Database("postgresql://u@h/db", False)),
        (
            "postgresql://postgres@/postgres?host=/tmp/pg&port=5432",
            Database("postgresql://postgres@/postgres?host=/tmp/pg&port=5432", False),
        ),
    ],
)
def test_postgresql_urls_are_taken(url: str, expected: Database) -> None:
    assert parse_database_url(url) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite:///orders.db", "PostgreSQL only"),
        ("sqlite+aiosqlite:///x.db", "PostgreSQL only"),
        ("mysql://u@h/db", "PostgreSQL only"),
        ("orders.db", "PostgreSQL only"),
        ("postgresql://u@h/db?pgbouncer=maybe", "pgbouncer must be true or false"),
        ("postgresql://u@h1,h2/db?pgbouncer=true", "give one host"),
    ],
)
def test_anything_else_is_refused_with_a_reason(url: str, says: str) -> None:
    with pytest.raises(DatabaseUrlError, match=says):
        parse_database_url(url)


def test_passwords_stay_out_of_logs() -> None:
    assert redacted("postgresql://u:secret@h1:1,h2:2/db") == "postgresql://u:***@h1:1,h2:2/db"
    assert redacted("postgresql://u@h/db") == "postgresql://u@h/db"
