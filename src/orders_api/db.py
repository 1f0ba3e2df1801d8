"""Schema (SQLAlchemy Core tables) and the async engine for PostgreSQL or the SQLite file."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orders_api.config import Settings

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL; on SQLite a fixed-width UTC text that sorts as it should.

    Values are always aware UTC datetimes with microseconds, on both backends.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JsonDocument = JSON().with_variant(JSONB(), "postgresql")

ORDER_STATUSES = ("draft", "confirmed", "closed")

orders = Table(
    "orders",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("version", Integer, nullable=False, server_default=text("1")),
    Column("total_cents", Integer, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    CheckConstraint("status IN ('draft', 'confirmed', 'closed')", name="status"),
    CheckConstraint("version >= 1", name="version_positive"),
)
Index(
    "ix_orders_tenant_created_id",
    orders.c.tenant_id,
    orders.c.created_at.desc(),
    orders.c.id.desc(),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("event_type", String(64), nullable=False),
    Column("order_id", Uuid(), nullable=False),
    Column("tenant_id", String(64), nullable=False),
    Column("payload", JsonDocument, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("published_at", UtcDateTime, nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", UtcDateTime, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("dead_at", UtcDateTime, nullable=True),
)
# The relay's work queue: rows neither published nor parked as dead, in due order.
Index(
    "ix_outbox_pending",
    outbox.c.next_attempt_at,
    postgresql_where=text("published_at IS NULL AND dead_at IS NULL"),
    sqlite_where=text("published_at IS NULL AND dead_at IS NULL"),
)
# Retention deletes published rows oldest first, in batches, without scanning the table.
Index(
    "ix_outbox_published_at",
    outbox.c.published_at,
    postgresql_where=text("published_at IS NOT NULL"),
    sqlite_where=text("published_at IS NOT NULL"),
)
# At most one orders.closed event per order, whatever races: the database says so.
Index(
    "ix_outbox_order_event",
    outbox.c.order_id,
    outbox.c.event_type,
    unique=True,
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant_id", String(64), nullable=False),
    Column("key", String(255), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response_json", JsonDocument, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("tenant_id", "key"),
)
Index("ix_idempotency_keys_created_at", idempotency_keys.c.created_at)

# Secrets generated once by the migration and shared by every worker and machine on the
# database (the cursor signing key), so zero configuration still gives stable cursors.
app_secrets = Table(
    "app_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


def sqlite_path(database_url: str) -> Path | None:
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    """One engine per process; PostgreSQL gets its timeouts at connect, SQLite its pragmas."""
    url = settings.database_url
    if settings.is_sqlite:
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url,
            connect_args={"timeout": settings.sqlite_busy_timeout_ms / 1000},
            pool_size=overrides.pop("pool_size", 5),
            max_overflow=0,
            **overrides,
        )
        _configure_sqlite(engine, settings.sqlite_busy_timeout_ms)
        return engine
    return create_async_engine(
        url,
        pool_size=overrides.pop("pool_size", settings.db_pool_size),
        max_overflow=overrides.pop("max_overflow", 0),
        pool_pre_ping=False,
        connect_args={
            "server_settings": pg_server_settings(settings),
            "command_timeout": pg_command_timeout(settings),
        },
        **overrides,
    )


def pg_server_settings(settings: Settings) -> dict[str, str]:
    """Session settings of every PostgreSQL connection (SQLAlchemy's and the asyncpg pool's)."""
    return {
        "statement_timeout": str(settings.db_statement_timeout_ms),
        "lock_timeout": str(settings.db_lock_timeout_ms),
        "idle_in_transaction_session_timeout": "60000",
        "application_name": "orders-api",
    }


def pg_command_timeout(settings: Settings) -> float:
    """The client-side bound: the server's statement_timeout answers first."""
    return settings.db_statement_timeout_ms / 1000 + 5


def pg_dsn(settings: Settings) -> str:
    """DATABASE_URL as plain libpq/asyncpg understands it (no SQLAlchemy driver suffix)."""
    url = make_url(settings.database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _configure_sqlite(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    """Take the write lock up front (BEGIN IMMEDIATE) so check-then-write is serialised.

    pysqlite's own transaction handling is switched off so that SQLAlchemy's BEGIN is the
    one that runs; read-only work (execution option readonly=True) begins DEFERRED.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        # WAL is a property of the file, set by its first connection. Asking for it on every
        # new connection (PRAGMA journal_mode=WAL) was not harmless: a connection that has
        # not read the file yet takes it for a rollback-journal file and tries the switch,
        # which under concurrent writes sometimes failed at once with "database is locked"
        # (no busy wait): about one burst of 24 same-key creates in 100 on a fresh two-worker
        # server got a 503. So read first (the mode is then known), switch only if needed.
        cursor.execute("SELECT count(*) FROM sqlite_master")
        cursor.execute("PRAGMA journal_mode")
        if cursor.fetchone()[0].lower() != "wal":
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        readonly = conn.get_execution_options().get("readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")
