"""The schema (SQLAlchemy Core tables, for Alembic) and DATABASE_URL parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


ORDER_STATUSES = ("draft", "confirmed", "closed")

orders = Table(
    "orders",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("version", Integer, nullable=False, server_default=text("1")),
    Column("total_cents", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("status IN ('draft', 'confirmed', 'closed')", name="status"),
    CheckConstraint("version >= 1", name="version_positive"),
)
Index(
    "ix_orders_tenant_created_id",
    orders.c.tenant_id,
    orders.c.created_at.desc(),
    orders.c.id.desc(),
)
# The list filtered by status: a deep page costs what the first does.
Index(
    "ix_orders_tenant_status_created_id",
    orders.c.tenant_id,
    orders.c.status,
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
    Column("payload", JSONB(), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=True),
    Column("dead_at", DateTime(timezone=True), nullable=True),
)
# The relay's work queue: rows neither published nor parked as dead, in due order.
Index(
    "ix_outbox_pending",
    outbox.c.next_attempt_at,
    postgresql_where=text("published_at IS NULL AND dead_at IS NULL"),
)
# Retention deletes published rows oldest first, in batches, without scanning the table.
Index(
    "ix_outbox_published_at",
    outbox.c.published_at,
    postgresql_where=text("published_at IS NOT NULL"),
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
    Column("response_json", JSONB(), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
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


class DatabaseUrlError(ValueError):
    """DATABASE_URL names something this service cannot run on."""


@dataclass(frozen=True, slots=True)
class Database:
    """Where the data lives, as asyncpg and libpq take it, and how to talk to it there."""

    dsn: str  # postgresql://…, several hosts allowed; the pgbouncer flag taken out
    pgbouncer: bool  # behind PgBouncer in transaction mode: no named statements, no session SET


_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_database_url(url: str) -> Database:
    """`postgresql://[user[:password]@]host[:port][,host[:port]…]/db[?params]`.

    `pgbouncer=true` is ours (the convention Prisma users know) and is not passed on; every
    other parameter (target_session_attrs, sslmode, host=/socket/dir, …) goes to the driver.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in _SCHEMES:
        shown = scheme if separator else url[:20]
        raise DatabaseUrlError(
            f"DATABASE_URL must be a postgresql:// URL, not {shown!r}: this service runs on "
            "PostgreSQL only (unset DATABASE_URL for the embedded PostgreSQL)"
        )
    location, _, query = rest.partition("?")
    pgbouncer = False
    kept = []
    for parameter in query.split("&") if query else ():
        name, _, value = parameter.partition("=")
        if name != "pgbouncer":
            kept.append(parameter)
        elif value.lower() in _TRUE:
            pgbouncer = True
        elif value.lower() not in _FALSE:
            raise DatabaseUrlError(f"DATABASE_URL: pgbouncer must be true or false, not {value!r}")
    if pgbouncer and "," in location.split("/", 1)[0]:
        # PgBouncer 1.18 reports the role (in_hot_standby) of the server it first connected
        # to, so a client cannot tell a demoted primary's bouncer from the new primary's.
        raise DatabaseUrlError(
            "DATABASE_URL: with pgbouncer=true give one host, a PgBouncer that follows the "
            "primary; several hosts behind PgBouncers cannot fail over"
        )
    dsn = f"postgresql://{location}" + (f"?{'&'.join(kept)}" if kept else "")
    return Database(dsn, pgbouncer)


def redacted(url: str) -> str:
    """The URL with its password replaced, for logs."""
    return re.sub(r"^([^:/?#]+://[^:@/]*):[^@/]*@", r"\1:***@", url)
