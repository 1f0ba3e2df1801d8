"""`orders-api relay` as a real process: the stdout default; SIGKILL mid-batch, SIGTERM, metrics."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import nats
import orjson
from prometheus_client.parser import text_string_to_metric_families

from orders_api.outbox.publishers import StdoutPublisher
from orders_api.outbox.relay import Relay
from orders_api.pool import Pool
from tests.helpers import free_port
from tests.integration.relay_support import (
    STREAM,
    NatsServer,
    close_orders,
    count_leased_unpublished,
    count_published,
    msg_ids,
    outbox_rows,
    relay_env,
    relay_settings,
    seed_outbox,
    stream_messages,
    wait_until,
)
from tests.live import ORDERS_API


async def start_relay(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as sink:
        return await asyncio.create_subprocess_exec(
            str(ORDERS_API), "relay", env=env, stdout=sink, stderr=sink
        )


def log_says(log: Path, event: str) -> Callable[[], Awaitable[bool]]:
    def read() -> bool:
        return log.exists() and event in log.read_text()

    async def check() -> bool:
        return await asyncio.to_thread(read)

    return check


_BUSY = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND state = 'active' AND pid <> pg_backend_pid()"
)


async def settled(pool: Pool) -> None:
    """After SIGSTOP: let the database finish what the frozen relay had already sent."""
    await asyncio.sleep(0.05)
    for _ in range(100):
        if not await pool.fetchval(_BUSY):
            return
        await asyncio.sleep(0.01)


async def stream_count(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if not sample.labels
    }


async def test_without_nats_url_the_relay_prints_one_json_line_per_event(
    pool: Pool, api: httpx.AsyncClient, relay_database: str
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await close_orders(api, tenant, 5)
    rows = await outbox_rows(pool)

    process = await asyncio.create_subprocess_exec(
        str(ORDERS_API),
        "relay",
        "--once",
        env=relay_env(relay_database),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 5
    events = [orjson.loads(line) for line in lines]
    assert sorted(event["id"] for event in events) == sorted(str(i) for i in rows)
    for event in events:
        row = rows[uuid.UUID(event["id"])]
        assert event["subject"] == "orders.closed"
        assert event["eventType"] == "orders.closed"
        assert event["tenantId"] == tenant
        assert event["orderId"] == str(row.order_id)
        assert event["payload"] == row.payload
    assert await count_published(pool) == 5

    # Published rows are not printed again.
    out_again = io.StringIO()
    relay = Relay(pool, StdoutPublisher("orders", out_again), relay_settings(relay_database))
    assert await relay.drain() == 0
    assert out_again.getvalue() == ""


async def test_relay_killed_mid_batch_then_restarted_loses_nothing(
    pool: Pool, relay_database: str, broker: NatsServer, tmp_path: Path
) -> None:
    total = 4000
    ids = await seed_outbox(pool, total)
    env = relay_env(
        relay_database,
        broker.url,
        RELAY_BATCH_SIZE="100",
        RELAY_LEASE_SECONDS="1",
        RELAY_PUBLISH_TIMEOUT_MS="800",
    )
    first = await start_relay(env, tmp_path / "first.log")
    second: asyncio.subprocess.Process | None = None
    try:
        # Freeze the relay at whatever it is doing; kill it only when frozen mid-batch: rows are
        # claimed and not marked, and the broker already holds some of them (acked, not marked).
        # A frozen process may have statements on the wire: let the servers finish them first.
        await wait_until(
            log_says(tmp_path / "first.log", "broker connected"),
            within=90,
            what="the relay to start",
            every=0.05,
        )
        deadline = time.monotonic() + 30
        while True:
            await asyncio.sleep(0.02)
            os.kill(first.pid, signal.SIGSTOP)
            await settled(pool)
            leased = await count_leased_unpublished(pool)
            published = await count_published(pool)
            stored = await stream_count(broker.url) if published else 0
            if leased and published and stored > published:
                break
            os.kill(first.pid, signal.SIGCONT)
            assert published < total, "the relay drained everything before it could be killed"
            assert time.monotonic() < deadline, "never caught the relay mid-batch"
        os.kill(first.pid, signal.SIGKILL)
        await first.wait()
        await asyncio.sleep(0.2)
        # What the killed relay left behind, now that it cannot change anything any more.
        leased = await count_leased_unpublished(pool)
        published = await count_published(pool)
        acked_not_marked = await stream_count(broker.url) - published
        assert leased > 0
        assert acked_not_marked > 0

        metrics_port = free_port()
        second = await start_relay(
            {**env, "RELAY_METRICS_PORT": str(metrics_port), "RELAY_METRICS_HOST": "127.0.0.1"},
            tmp_path / "second.log",
        )

        async def all_published() -> bool:
            return await count_published(pool) == total

        await wait_until(all_published, within=30, what="the restarted relay to catch up")
        metrics = await asyncio.to_thread(scrape, metrics_port)
        await asyncio.sleep(0.3)  # idle now, waiting for work
        stopping = time.monotonic()
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), timeout=15) == 0
        assert time.monotonic() - stopping < 3, "an idle relay took long to honour SIGTERM"
        assert "relay stopped" in (tmp_path / "second.log").read_text()
    finally:
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()

    messages = await stream_messages(broker.url)
    assert len(messages) == total, "lost or duplicated messages in the stream"
    assert set(msg_ids(messages)) == {str(event_id) for event_id in ids}
    rows = await outbox_rows(pool)
    # Exactly the rows claimed by the killed relay were sent a second time, after their lease.
    assert sum(row.attempts == 2 for row in rows.values()) == leased
    assert sum(row.attempts == 1 for row in rows.values()) == total - leased
    # Those the broker already had were recognised as duplicates by their Nats-Msg-Id.
    assert metrics["orders_api_relay_duplicates_total"] == acked_not_marked
    assert metrics["orders_api_relay_published_total"] == total - published
