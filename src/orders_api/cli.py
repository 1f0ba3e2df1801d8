"""orders-api serve | migrate | purge | relay | outbox requeue."""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import structlog

from orders_api.config import Settings

log = structlog.get_logger("orders_api.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orders-api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    serve.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))

    commands.add_parser("migrate", help="apply database migrations")
    commands.add_parser("purge", help="delete expired idempotency keys once")

    relay = commands.add_parser("relay", help="publish outbox rows to NATS JetStream (or stdout)")
    relay.add_argument("--once", action="store_true", help="drain what is due, then exit")
    outbox = commands.add_parser("outbox", help="outbox maintenance")
    outbox_commands = outbox.add_subparsers(dest="outbox_command", required=True)
    requeue = outbox_commands.add_parser("requeue", help="make dead outbox rows pending again")
    requeue.add_argument(
        "--id", dest="ids", type=uuid.UUID, action="append", help="only this row (repeatable)"
    )

    args = parser.parse_args(argv)
    settings = Settings()
    from orders_api.observability import configure_logging

    configure_logging(settings.log_level)
    if args.command == "serve":
        return run_server(settings, args.host, args.port, args.workers)
    if args.command == "migrate":
        migrate(settings)
        return 0
    if args.command == "purge":
        return asyncio.run(purge(settings))
    if args.command == "relay":
        from orders_api.outbox.relay import run_relay

        return run_relay(settings, once=args.once)
    if args.command == "outbox":
        from orders_api.outbox.relay import requeue as requeue_dead

        return requeue_dead(settings, args.ids)
    parser.error(f"unknown command {args.command}")
    return 2


def migrate(settings: Settings) -> None:
    from orders_api.migrations import upgrade

    upgrade(settings.database_url)
    log.info("migrated", database=_redacted(settings.database_url))


def run_server(settings: Settings, host: str, port: int, workers: int) -> int:
    import uvicorn

    if settings.should_migrate_on_start:
        migrate(settings)
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics here; /metrics on any worker sums them all.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="orders-api-metrics-")
    uvicorn.run(
        "orders_api.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=20,
    )
    return 0


async def purge(settings: Settings) -> int:
    from orders_api.db import create_engine
    from orders_api.idempotency import purge_expired_keys

    engine = create_engine(settings)
    try:
        removed = await purge_expired_keys(
            engine,
            timedelta(seconds=settings.idempotency_window_seconds),
            datetime.now(UTC),
        )
    finally:
        await engine.dispose()
    log.info("purged idempotency keys", removed=removed)
    return 0


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
