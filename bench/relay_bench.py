"""Outbox relay on PostgreSQL: drain throughput (events/s) and close-to-delivery latency.

`python -m bench.relay_bench` (BENCH_PG_URL, default postgres@127.0.0.1:5432). It starts its
own nats-server on a free port with a temporary store (never the machine's shared one) and
its own database, orders_bench_relay.

throughput  a backlog of outbox rows drained by one in-process relay (batch 100 and 500), then
            by two `orders-api relay` processes at once (both woken by the insert's NOTIFY).
latency     one `orders-api relay` process with default settings (LISTEN/NOTIFY wake-up).
            sql: confirmed orders closed at a steady rate with the API's own close statement
            (orders/store.py CLOSE, autocommit: committed when it returns) and, as the API
            does, the coalesced wake-up after the commit (WAKE_RELAY, at most one in flight)
            from a light asyncpg client; latency = message received by a NATS subscriber
            on orders.closed - close statement returned. http: the same through
            `orders-api serve --workers 2`, measured from the request being sent. Both
            also report the database's view, published_at - created_at (close's clock
            reading -> relay's reading after the ack).
            A rate the closer could not sustain is marked saturated: its latency is queueing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import nats
import orjson

from bench.harness import (
    RESULTS,
    VENV_BIN,
    free_port,
    fresh_database,
    machine,
    out,
    serve,
    write_results,
)
from orders_api.config import Settings
from orders_api.observability import configure_logging
from orders_api.orders.store import CLOSE, WAKE_RELAY
from orders_api.outbox import RelayWakeUp
from orders_api.outbox.publishers import JetStreamPublisher
from orders_api.outbox.relay import Relay
from orders_api.pool import Pool

DATABASE = "orders_bench_relay"
IN_FLIGHT = 16
STREAM = "ORDERS_BENCH"

SEED_OUTBOX = """
WITH o AS (
    INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at, updated_at)
    SELECT gen_random_uuid(), 'bench-relay', 'closed', 3, g, clock_timestamp(), clock_timestamp()
    FROM generate_series(1, $1) AS g
    RETURNING id, tenant_id, total_cents, updated_at
), e AS (
    INSERT INTO outbox
        (id, event_type, order_id, tenant_id, payload, created_at, next_attempt_at, attempts)
    SELECT gen_random_uuid(), 'orders.closed', id, tenant_id,
           jsonb_build_object('orderId', id, 'tenantId', tenant_id, 'totalCents', total_cents,
                              'closedAt', to_char(updated_at AT TIME ZONE 'UTC',
                                                  'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
           updated_at, updated_at, 0
    FROM o
)
SELECT pg_notify('orders_outbox', '')
"""

SEED_CONFIRMED = """
INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at, updated_at)
SELECT gen_random_uuid(), $1, 'confirmed', 2, g, clock_timestamp(), clock_timestamp()
FROM generate_series(1, $2) AS g
RETURNING id
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="relay-bench-nats-") as store:
        process = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                time.sleep(0.05)
            yield f"nats://127.0.0.1:{port}"
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)


def relay_environment(url: str, nats_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "NATS_"))}
    env.update(DATABASE_URL=url, NATS_URL=nats_url, RELAY_STREAM=STREAM, LOG_LEVEL="WARNING")
    return env


@contextlib.contextmanager
def relay_processes(url: str, nats_url: str, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    processes = []
    for index in range(count):
        log = (RESULTS / f"relay-bench.relay{index}.log").open("wb")
        processes.append(
            subprocess.Popen(
                [str(VENV_BIN / "orders-api"), "relay"],
                env=relay_environment(url, nats_url),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        yield processes
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


async def pending(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))


async def wait_drained(conn: asyncpg.Connection, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while await pending(conn):
        if time.monotonic() > deadline:
            raise RuntimeError("relay did not drain the outbox in time")
        await asyncio.sleep(0.01)


async def stream_count(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()


async def throughput_in_process(url: str, nats_url: str, rows: int, batch: int) -> dict[str, Any]:
    settings = Settings.model_validate(
        {
            "database_url": url,
            "nats_url": nats_url,
            "relay_stream": STREAM,
            "relay_batch_size": batch,
            "log_level": "WARNING",
        }
    )
    conn = await asyncpg.connect(url)
    pool = Pool.from_settings("relay", settings, max_size=2)
    publisher = JetStreamPublisher(settings)
    try:
        await conn.execute("TRUNCATE outbox, orders")
        await conn.fetchval(SEED_OUTBOX, rows)
        relay = Relay(pool, publisher, settings)
        assert await publisher.start(asyncio.Event(), 10)
        await publisher.prepare()
        started = time.perf_counter()
        delivered = await relay.drain()
        elapsed = time.perf_counter() - started
        assert delivered == rows, (delivered, rows)
        assert await pending(conn) == 0
    finally:
        await publisher.close()
        await pool.close()
        await conn.close()
    rate = rows / elapsed
    out(f"  1 relay in-process, batch {batch:>4}: {rows} rows in {elapsed:.2f} s = {rate:,.0f}/s")
    return {"relays": 1, "batch": batch, "rows": rows, "seconds": elapsed, "events_per_s": rate}


async def throughput_two_processes(url: str, nats_url: str, rows: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE outbox, orders")
        with relay_processes(url, nats_url, 2):
            await asyncio.sleep(8)  # both started, connected and LISTENing
            started = time.perf_counter()
            await conn.fetchval(SEED_OUTBOX, rows)
            await wait_drained(conn, within_s=300)
            elapsed = time.perf_counter() - started
        attempts = await conn.fetchval("SELECT max(attempts) FROM outbox")
    finally:
        await conn.close()
    rate = rows / elapsed
    out(f"  2 relay processes, batch  100: {rows} rows in {elapsed:.2f} s = {rate:,.0f}/s")
    return {
        "relays": 2,
        "batch": 100,
        "rows": rows,
        "seconds": elapsed,
        "events_per_s": rate,
        "max_attempts": attempts,
    }


@contextlib.asynccontextmanager
async def subscriber(
    nats_url: str, expected: int, done: asyncio.Event
) -> AsyncIterator[dict[str, float]]:
    received: dict[str, float] = {}
    nc = await nats.connect(nats_url)

    async def on_message(msg: Any) -> None:
        received.setdefault(orjson.loads(msg.data)["orderId"], time.perf_counter())
        if len(received) >= expected:
            done.set()

    await nc.subscribe("orders.closed", cb=on_message)
    try:
        yield received
    finally:
        await nc.close()


async def latency(
    url: str, nats_url: str, rate: int, seconds: float, base_url: str | None = None
) -> dict[str, Any]:
    """Close `rate` orders a second for `seconds`; through HTTP when `base_url` is given."""
    mode = "http" if base_url else "sql"
    tenant = f"bench-latency-{mode}-{rate}"
    count = int(rate * seconds)
    conn = await asyncpg.connect(url)
    pool = await asyncpg.create_pool(url, min_size=IN_FLIGHT, max_size=IN_FLIGHT)
    wake_relay = RelayWakeUp(lambda: pool.execute(WAKE_RELAY))
    try:
        ids = [r["id"] for r in await conn.fetch(SEED_CONFIRMED, tenant, count)]
        closed: dict[str, float] = {}
        errors = 0
        limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
        all_received = asyncio.Event()
        async with (
            subscriber(nats_url, len(ids), all_received) as received,
            httpx.AsyncClient(base_url=base_url or "", limits=limits, timeout=60) as client,
        ):
            # At most IN_FLIGHT closes at once: a backlog in the client is not the relay's.
            in_flight = asyncio.Semaphore(IN_FLIGHT)

            async def close_over_http(order_id: uuid.UUID) -> None:
                nonlocal errors
                async with in_flight:
                    sent = time.perf_counter()
                    response = await client.post(
                        f"/orders/{order_id}/close", headers={"X-Tenant-Id": tenant}
                    )
                if response.status_code != 200:
                    errors += 1
                    return
                closed[str(order_id)] = sent

            async def close_in_sql(order_id: uuid.UUID) -> None:
                nonlocal errors
                async with in_flight:
                    now = datetime.now(UTC)
                    closed_at = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                    version = await pool.fetchval(
                        CLOSE, order_id, tenant, None, now, uuid.uuid4(), closed_at, None, None
                    )
                    committed = time.perf_counter()
                if version is None:
                    errors += 1
                    return
                wake_relay()
                closed[str(order_id)] = committed

            close = close_over_http if base_url else close_in_sql
            started = time.perf_counter()
            tasks = []
            for index, order_id in enumerate(ids):
                delay = started + index / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(close(order_id)))
            await asyncio.gather(*tasks)
            sent_for = time.perf_counter() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_received.wait(), timeout=30)
        rows = await conn.fetch(
            """
            SELECT extract(epoch FROM published_at - created_at) AS lag
            FROM outbox WHERE tenant_id = $1 AND published_at IS NOT NULL
            """,
            tenant,
        )
    finally:
        await wake_relay.close()
        await pool.close()
        await conn.close()
    lost = [order_id for order_id in closed if order_id not in received]
    wire = [(received[i] - closed[i]) * 1000 for i in closed if i in received]
    db_lag = [float(r["lag"]) * 1000 for r in rows]
    achieved = len(closed) / sent_for
    view = "request sent -> message" if base_url else "close committed -> message"
    result = {
        "mode": mode,
        "target_rate": rate,
        "achieved_rate": round(achieved, 1),
        "saturated": achieved < 0.9 * rate,
        "closes": len(closed),
        "errors": errors,
        "not_received": len(lost),
        "view": view,
        "to_message_ms": {
            "p50": round(percentile(wire, 0.5), 2),
            "p90": round(percentile(wire, 0.9), 2),
            "p99": round(percentile(wire, 0.99), 2),
            "max": round(max(wire), 2),
        },
        "created_to_published_ms": {
            "p50": round(percentile(db_lag, 0.5), 2),
            "p99": round(percentile(db_lag, 0.99), 2),
        },
    }
    wire_ms = result["to_message_ms"]
    out(
        f"  {mode:>4} {rate:>5}/s ({result['achieved_rate']}/s achieved"
        f"{', SATURATED' if result['saturated'] else ''}; {len(closed)} closes, {errors} errors, "
        f"{len(lost)} not received): {view} p50 {wire_ms['p50']} ms, p99 {wire_ms['p99']} ms, "
        f"max {wire_ms['max']} ms; created->published p50 "
        f"{result['created_to_published_ms']['p50']} ms, "
        f"p99 {result['created_to_published_ms']['p99']} ms"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000, help="backlog for throughput")
    parser.add_argument("--rates", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--http-rates", type=int, nargs="*", default=[100])
    parser.add_argument("--seconds", type=float, default=10.0, help="per latency rate")
    args = parser.parse_args()

    configure_logging("WARNING")
    url = fresh_database(DATABASE)
    results: dict[str, Any] = {"machine": machine(), "throughput": [], "latency": []}
    with nats_server() as nats_url:
        out(f"relay throughput (PostgreSQL, JetStream file storage, {args.rows} rows)")
        for batch in (100, 500):
            results["throughput"].append(
                asyncio.run(throughput_in_process(url, nats_url, args.rows, batch))
            )
        results["throughput"].append(
            asyncio.run(throughput_two_processes(url, nats_url, args.rows))
        )
        asyncio.run(_truncate(url))
        out("close-to-delivery latency (one relay process, default settings)")
        with relay_processes(url, nats_url, 1):
            time.sleep(5)  # relay connected and LISTENing
            for rate in args.rates:
                results["latency"].append(asyncio.run(latency(url, nats_url, rate, args.seconds)))
            with serve(url, 2, "relay-bench") as server:
                for rate in args.http_rates:
                    results["latency"].append(
                        asyncio.run(latency(url, nats_url, rate, args.seconds, server.base_url))
                    )
        results["stream_messages"] = asyncio.run(stream_count(nats_url))
    path = write_results("relay", results)
    out(f"results: {path}")


async def _truncate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE outbox, orders")
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
