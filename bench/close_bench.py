"""Close statement throughput: NOTIFY inside the close vs a coalesced wake-up after it.

`python -m bench.close_bench` builds its own PostgreSQL 15 from the Debian binaries
(/usr/lib/postgresql/15/bin, run as the postgres OS user, private ports and folders under
/tmp, removed afterwards; the machine's shared server is never touched): a primary and a
synchronous standby (synchronous_standby_names='*', synchronous_commit=on), then the same
primary with the standby stopped and synchronous_standby_names='' (a plain server).

On each, N concurrent clients (asyncpg, on the API's own pool) close distinct confirmed
orders as fast as they can, alternating rounds of
  old  the close of commit 333bdb5: one CTE whose SELECT calls pg_notify, so every close
       takes PostgreSQL's database-wide notify lock from pre-commit until after its commit
       (and its wait for the standby);
  new  orders_api.orders.store.CLOSE (no notify; key parameters NULL), then, after the
       commit, the API's wake-up (store.WAKE_RELAY through orders_api.outbox.RelayWakeUp:
       at most one in flight per process, coalescing the closes that commit meanwhile).
One connection LISTENs on the channel throughout, as a relay would. Closes/s are counted
between the first and the last second of each run; each run walks its own orders.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import (
    VENV_BIN,
    as_postgres,
    free_port,
    loadavg,
    machine,
    median,
    out,
    write_results,
)
from orders_api.config import Settings
from orders_api.orders.store import CLOSE, WAKE_RELAY
from orders_api.outbox import NOTIFY_CHANNEL, RelayWakeUp
from orders_api.pool import Pool

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DATABASE = "orders_close_bench"

# orders_api/orders/pg.py CLOSE at commit 333bdb5 (`git show 333bdb5:src/orders_api/orders/pg.py`).
OLD_CLOSE = f"""WITH closed AS (
    UPDATE orders
    SET status = 'closed', version = version + 1, updated_at = $4
    WHERE id = $1 AND tenant_id = $2 AND status = 'confirmed'
      AND ($3::int[] IS NULL OR version = ANY($3::int[]))
    RETURNING id, tenant_id, version, total_cents
), event AS (
    INSERT INTO outbox
        (id, event_type, order_id, tenant_id, payload, created_at, next_attempt_at, attempts)
    SELECT $5, 'orders.closed', id, tenant_id,
           jsonb_build_object('orderId', id, 'tenantId', tenant_id,
                              'totalCents', total_cents, 'closedAt', $6::text),
           $4, $4, 0
    FROM closed
)
SELECT version, pg_notify('{NOTIFY_CHANNEL}', '') FROM closed
"""

SEED_CONFIRMED = """
INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at, updated_at)
SELECT gen_random_uuid(), $1, 'confirmed', 2, g, clock_timestamp(), clock_timestamp()
FROM generate_series(1, $2) AS g
RETURNING id
"""

SERVER_SETTINGS = """
listen_addresses = '127.0.0.1'
max_connections = 200
shared_buffers = 256MB
wal_level = replica
max_wal_senders = 4
synchronous_commit = on
fsync = on
"""


def postgres(*command: str) -> None:
    subprocess.run(as_postgres(command), check=True, stdout=subprocess.DEVNULL, cwd="/tmp")


class Node:
    def __init__(self, root: Path, name: str) -> None:
        self.data = root / name
        self.port = free_port()
        self.log = root / f"{name}.log"

    def start(self) -> None:
        postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def primary_and_standby() -> Iterator[tuple[Node, Node]]:
    """A primary and a streaming standby it waits for on every commit."""
    root = Path(tempfile.mkdtemp(prefix="orders-close-bench-"))
    shutil.chown(root, "postgres")
    primary, standby = Node(root, "primary"), Node(root, "standby")
    try:
        postgres(str(PG_BIN / "initdb"), "-D", str(primary.data), "-A", "trust", "-U", "postgres")
        with (primary.data / "postgresql.conf").open("a") as conf:
            conf.write(SERVER_SETTINGS)
            conf.write(f"port = {primary.port}\nunix_socket_directories = '{root}'\n")
            conf.write("synchronous_standby_names = '*'\n")
        primary.start()
        postgres(
            str(PG_BIN / "pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
            *("-D", str(standby.data), "-R", "-X", "stream", "-c", "fast"),
        )
        with (standby.data / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {standby.port}\n")
        standby.start()
        asyncio.run(wait_sync(primary.url()))
        yield primary, standby
    finally:
        for node in (standby, primary):
            with contextlib.suppress(subprocess.CalledProcessError):
                node.stop()
        shutil.rmtree(root, ignore_errors=True)


async def wait_sync(url: str, within_s: float = 60) -> None:
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + within_s
        while await conn.fetchval("SELECT sync_state FROM pg_stat_replication") != "sync":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not become synchronous")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def make_plain(url: str) -> None:
    """No synchronous standby any more: commits wait for the local WAL flush only."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
        await conn.execute("SELECT pg_reload_conf()")
        await asyncio.sleep(0.5)
        assert await conn.fetchval("SHOW synchronous_standby_names") == ""
    finally:
        await conn.close()


async def create_database(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()


def setup_database(url: str) -> str:
    """The orders schema, migrated by this tree's `orders-api migrate`; returns its URL."""
    asyncio.run(create_database(url))
    db_url = url.rsplit("/", 1)[0] + f"/{DATABASE}"
    subprocess.run(
        [str(VENV_BIN / "orders-api"), "migrate"],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": db_url, "LOG_LEVEL": "WARNING"},
        check=True,
    )
    return db_url


async def seed(url: str, tenant: str, count: int) -> list[uuid.UUID]:
    conn = await asyncpg.connect(url)
    try:
        ids = [r["id"] for r in await conn.fetch(SEED_CONFIRMED, tenant, count)]
        await conn.execute("ANALYZE orders")
    finally:
        await conn.close()
    return ids


async def close_run(
    url: str, variant: str, clients: int, seconds: float, count: int
) -> dict[str, Any]:
    """`clients` closers for `seconds` (or until `count` orders are closed)."""
    tenant = f"close-{variant}-{clients}-{uuid.uuid4().hex[:8]}"
    ids = iter(await seed(url, tenant, count))
    settings = Settings.model_validate({"database_url": url, "log_level": "WARNING"})
    pool = Pool.from_settings("bench", settings, max_size=clients)
    listener = await asyncpg.connect(url)
    heard = 0
    sent = 0

    def on_notify(*_args: object) -> None:
        nonlocal heard
        heard += 1

    async def send_wake_up() -> None:
        nonlocal sent
        sent += 1
        await pool.execute(WAKE_RELAY)

    await listener.add_listener(NOTIFY_CHANNEL, on_notify)
    wake_relay = RelayWakeUp(send_wake_up)
    done: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def closer() -> None:
        nonlocal errors
        for order_id in ids:
            if time.perf_counter() >= stop_at:
                return
            now = datetime.now(UTC)
            closed_at = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            if variant == "old":
                row = await pool.fetchrow(
                    OLD_CLOSE, order_id, tenant, None, now, uuid.uuid4(), closed_at
                )
                version = None if row is None else row[0]
            else:
                version = await pool.fetchval(
                    CLOSE, order_id, tenant, None, now, uuid.uuid4(), closed_at, None, None
                )
                if version is not None:
                    wake_relay()
            if version is None:
                errors += 1
            else:
                done.append(time.perf_counter())

    started = time.perf_counter()
    try:
        await asyncio.gather(*(closer() for _ in range(clients)))
        await asyncio.sleep(0.2)  # the last wake-up and notifications arrive
    finally:
        await wake_relay.close()
        await listener.close()
        await pool.close()
    # The steady part: from the end of the first second to the end of the last full one.
    first, last = started + 1.0, min(stop_at, done[-1] if done else stop_at)
    steady = [t for t in done if first <= t <= last]
    rate = len(steady) / (last - first) if last > first else 0.0
    return {
        "variant": variant,
        "clients": clients,
        "closes": len(done),
        "closes_per_s": round(rate, 1),
        "errors": errors,
        "ran_out_of_orders": len(done) + errors >= count,
        "wake_ups_sent": sent if variant == "new" else len(done),
        "notifications_heard": heard,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }


async def phase(
    url: str, label: str, clients: list[int], rounds: int, seconds: float
) -> dict[str, Any]:
    count = int(seconds * 8_000)
    runs: list[dict[str, Any]] = []
    for round_no in range(rounds):
        variants = ("old", "new") if round_no % 2 == 0 else ("new", "old")
        for n in clients:
            for variant in variants:
                run = await close_run(url, variant, n, seconds, count)
                runs.append(run)
                out(
                    f"  {label:<8} r{round_no + 1} {variant} {n:>3} clients "
                    f"{run['closes_per_s']:>8.1f} closes/s ({run['closes']} closed)  "
                    f"errors {run['errors']}  "
                    f"wake-ups {run['wake_ups_sent']}  heard {run['notifications_heard']}"
                    f"{'  RAN OUT OF ORDERS' if run['ran_out_of_orders'] else ''}"
                )
    summary: dict[str, Any] = {}
    for n in clients:
        by_variant = {
            v: [r["closes_per_s"] for r in runs if r["variant"] == v and r["clients"] == n]
            for v in ("old", "new")
        }
        old, new = median(by_variant["old"]), median(by_variant["new"])
        summary[str(n)] = {
            "old_closes_per_s": old,
            "new_closes_per_s": new,
            "new_over_old": round(new / old, 3) if old else None,
            "rounds": by_variant,
            "errors": sum(r["errors"] for r in runs if r["clients"] == n),
        }
    return {"runs": runs, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="16,64", help="concurrent closers")
    parser.add_argument("--rounds", type=int, default=3, help="alternating old/new rounds")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    results: dict[str, Any] = {"machine": machine(), "loadavg_before": loadavg()}

    out("== primary + synchronous standby (PostgreSQL 15, private ports under /tmp)")
    with primary_and_standby() as (primary, standby):
        url = setup_database(primary.url())
        out(f"  primary :{primary.port}, standby :{standby.port}, synchronous")
        results["sync_rep"] = asyncio.run(
            phase(url, "sync-rep", clients, args.rounds, args.duration)
        )
        out("== the same primary, standby stopped, synchronous_standby_names = ''")
        standby.stop()
        asyncio.run(make_plain(primary.url()))
        results["plain"] = asyncio.run(phase(url, "plain", clients, args.rounds, args.duration))
    results["loadavg_after"] = loadavg()

    out()
    out(f"{'server':<9} {'clients':>7} {'old closes/s':>13} {'new closes/s':>13} {'new/old':>8}")
    for label in ("sync_rep", "plain"):
        for n, s in results[label]["summary"].items():
            out(
                f"{label:<9} {n:>7} {s['old_closes_per_s']:>13.1f} "
                f"{s['new_closes_per_s']:>13.1f} {s['new_over_old']:>8.2f}"
            )
    out(f"(medians of {args.rounds} alternating rounds of {args.duration:g} s)")
    out(f"loadavg before {results['loadavg_before']}, after {results['loadavg_after']}")
    path = write_results("close-bench", results)
    out(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
