"""Alembic environment: asyncpg on DATABASE_URL (several hosts allowed), one migrator at a time."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from orders_api.config import Settings
from orders_api.db import metadata, parse_database_url

config = context.config
database = parse_database_url(config.attributes.get("database_url") or Settings().database_url)

# Any constant: concurrent `orders-api migrate` runs queue behind this lock.
_MIGRATION_LOCK = 7_246_114_001


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
        context.run_migrations()


async def _run_online() -> None:
    # asyncpg reads the URL itself (SQLAlchemy's URL type has no room for several hosts).
    engine = create_async_engine(
        "postgresql+asyncpg://",
        poolclass=pool.NullPool,
        async_creator=lambda: asyncpg.connect(database.dsn, statement_cache_size=0),
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


asyncio.run(_run_online())
