"""orders-api serve | migrate | relay | purge | dburl | outbox requeue."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from orders_api.config import Settings
from orders_api.db import DatabaseUrlError, parse_database_url, redacted

log = structlog.get_logger("orders_api.cli")


class CommandError(Exception):
    """A configuration the command cannot run with: printed as is, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orders-api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    serve.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))
    serve.add_argument(
        "--server",
        choices=("uvicorn", "granian"),
        default=os.environ.get("SERVER", "uvicorn"),
        help="the ASGI server (README: Performance)",
    )

    commands.add_parser("migrate", help="apply database migrations")
    commands.add_parser("purge", help="delete expired idempotency keys once")
    commands.add_parser("dburl", help="print the database URL in effect (embedded or configured)")

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
    try:
        if args.command == "dburl":
            sys.stdout.write(database_url_in_effect(settings) + "\n")
            return 0
        with database(settings) as (settings, embedded):
            return run(args, settings, migrate_first=_migrate_first(settings, embedded))
    except CommandError as exc:
        sys.stderr.write(f"orders-api: {exc}\n")
        return 2


def run(args: argparse.Namespace, settings: Settings, *, migrate_first: bool) -> int:
    if args.command == "migrate":
        migrate(settings)
        return 0
    if migrate_first:
        migrate(settings)
    if args.command == "serve":
        return run_server(args.host, args.port, args.workers, args.server)
    if args.command == "purge":
        return asyncio.run(purge(settings))
    if args.command == "relay":
        from orders_api.outbox.relay import run_relay

        return run_relay(settings, once=args.once)
    from orders_api.outbox.relay import requeue as requeue_dead

    return requeue_dead(settings, args.ids)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[tuple[Settings, bool]]:
    """The settings with the database in effect, and whether it is the embedded one.

    With no DATABASE_URL the embedded PostgreSQL in EMBEDDED_PG_DIR is started (or joined)
    here, once, before any worker exists; its URL goes into the environment, so the workers
    uvicorn spawns and everything this process runs use it. It stops when the last process
    using it leaves.
    """
    if settings.database_url:
        try:
            parse_database_url(settings.database_url)
        except DatabaseUrlError as exc:
            raise CommandError(str(exc)) from None
        yield settings, False
        return
    from orders_api import embedded

    folder = Path(settings.embedded_pg_dir)
    # SIGTERM's default action would skip the exit hooks that stop the server.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        url = embedded.start(folder)
    except embedded.EmbeddedUnavailable as exc:
        raise CommandError(str(exc)) from None
    try:
        os.environ["DATABASE_URL"] = url
        log.info("embedded postgresql", folder=str(folder), url=url)
        yield settings.model_copy(update={"database_url": url}), True
    finally:
        embedded.release(folder)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def database_url_in_effect(settings: Settings) -> str:
    """DATABASE_URL, or the URL of the embedded server running in EMBEDDED_PG_DIR."""
    if settings.database_url:
        return settings.database_url
    from orders_api import embedded

    url = embedded.url_of_running(Path(settings.embedded_pg_dir))
    if url is None:
        raise CommandError(
            f"no embedded PostgreSQL is running in {settings.embedded_pg_dir}: start "
            "`orders-api serve` (or set DATABASE_URL)"
        )
    return url


def _migrate_first(settings: Settings, embedded: bool) -> bool:
    """The embedded default migrates itself; a configured server is migrated by
    `orders-api migrate` unless MIGRATE_ON_START says otherwise."""
    return embedded if settings.migrate_on_start is None else settings.migrate_on_start


def migrate(settings: Settings) -> None:
    from orders_api.migrations import upgrade

    upgrade(settings.database_url)
    log.info("migrated", database=redacted(settings.database_url))


def run_server(host: str, port: int, workers: int, server: str = "uvicorn") -> int:
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics here; /metrics on any worker sums them all.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="orders-api-metrics-")
    factory = "orders_api.app:create_app_from_env"
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces, Loops

        Granian(
            factory,
            factory=True,
            address=host,
            port=port,
            workers=workers,
            interface=Interfaces.ASGI,
            loop=Loops.uvloop,
            log_access=False,
            respawn_failed_workers=True,
            workers_kill_timeout=20,
        ).serve()
        return 0
    import uvicorn

    uvicorn.run(
        factory,
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
    from orders_api.idempotency import purge_expired_keys
    from orders_api.pool import Pool

    pool = Pool.from_settings("purge", settings, max_size=1)
    try:
        removed = await purge_expired_keys(
            pool, timedelta(seconds=settings.idempotency_window_seconds), datetime.now(UTC)
        )
    finally:
        await pool.close()
    log.info("purged idempotency keys", removed=removed)
    return 0
