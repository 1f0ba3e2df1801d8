"""The outbox relay in-process against a real nats-server and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import nats
import orjson
from nats.js.api import StreamConfig
from prometheus_client import REGISTRY

from orders_api.outbox.publishers import JetStreamPublisher, StdoutPublisher
from orders_api.outbox.relay import Relay
from orders_api.pool import Pool
from tests.integration.relay_support import (
    STREAM,
    CountingPublisher,
    NatsServer,
    close_order,
    close_orders,
    confirm_orders,
    count_published,
    msg_ids,
    outbox_rows,
    relay_env,
    relay_settings,
    running,
    seed_outbox,
    stream_messages,
    wait_until,
)
from tests.live import ORDERS_API


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_closed_orders_reach_the_stream_with_their_outbox_ids(
    pool: Pool, api: httpx.AsyncClient, relay_database: str, broker: NatsServer
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    order_ids = await close_orders(api, tenant, 12)
    rows = await outbox_rows(pool)
    assert sorted(row.order_id for row in rows.values()) == sorted(order_ids)
    published_before = metric("orders_api_relay_published_total")

    settings = relay_settings(relay_database, broker.url)
    relay = Relay(pool, JetStreamPublisher(settings), settings)
    assert await relay.run_once(connect_timeout=5) == 0

    messages = await stream_messages(broker.url)
    assert sorted(msg_ids(messages)) == sorted(str(event_id) for event_id in rows)
    for message in messages:
        headers = message.headers or {}
        row = rows[uuid.UUID(headers["Nats-Msg-Id"])]
        assert message.subject == "orders.closed"
        assert headers["Event-Type"] == "orders.closed"
        assert headers["Tenant-Id"] == tenant
        assert headers["Order-Id"] == str(row.order_id)
        assert orjson.loads(message.data or b"") == row.payload
        assert row.payload["orderId"] == str(row.order_id)
    after = await outbox_rows(pool)
    assert all(row.published_at is not None for row in after.values())
    assert {row.attempts for row in after.values()} == {1}
    assert all(row.dead_at is None and row.last_error is None for row in after.values())
    assert metric("orders_api_relay_published_total") - published_before == 12
    stats = await relay.refresh_stats()
    assert stats.rows == 0
    assert metric("orders_api_relay_pending_rows") == 0


async def test_two_relays_draining_500_rows_publish_each_row_once(
    pool: Pool, relay_database: str, broker: NatsServer
) -> None:
    ids = await seed_outbox(pool, 500)
    settings = relay_settings(relay_database, broker.url, relay_batch_size=25)
    pools = [Pool.from_settings("relay", settings, max_size=2) for _ in range(2)]
    publishers = [CountingPublisher(JetStreamPublisher(settings)) for _ in range(2)]
    relays = [Relay(q, p, settings) for q, p in zip(pools, publishers, strict=True)]
    never = asyncio.Event()
    try:
        for publisher in publishers:
            assert await publisher.start(never, 5)
        delivered = await asyncio.gather(*(relay.drain() for relay in relays))
    finally:
        for publisher in publishers:
            await publisher.close()
        for each in pools:
            await each.close()

    sends = publishers[0].attempted + publishers[1].attempted
    assert len(sends) == 500, "a row was sent twice (or not at all)"
    assert set(sends) == set(ids)
    assert all(publisher.attempted for publisher in publishers), "one relay did all the work"
    assert sum(delivered) == 500
    messages = await stream_messages(broker.url)
    assert len(messages) == 500
    assert set(msg_ids(messages)) == {str(event_id) for event_id in ids}
    rows = await outbox_rows(pool)
    assert all(row.published_at is not None for row in rows.values())
    assert {row.attempts for row in rows.values()} == {1}


# What a close transaction writes, held open by the test: the order and its outbox row.
_CLOSE_ORDER = """UPDATE orders SET status = 'closed', version = version + 1, updated_at = $3
WHERE id = $1 AND tenant_id = $2 AND status = 'confirmed'"""
_INSERT_EVENT = """INSERT INTO outbox
    (id, event_type, order_id, tenant_id, payload, created_at, next_attempt_at, attempts)
VALUES ($1, 'orders.closed', $2, $3, $4::jsonb, $5, $5, 0)"""


async def test_a_row_whose_transaction_commits_late_is_still_delivered(
    pool: Pool, api: httpx.AsyncClient, relay_database: str, broker: NatsServer
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    settings = relay_settings(relay_database, broker.url)
    publisher = JetStreamPublisher(settings)
    relay = Relay(pool, publisher, settings)
    assert await publisher.start(asyncio.Event(), 5)
    late_id = uuid.uuid4()
    try:
        # A close transaction that starts first (its rows carry the earliest timestamps) and
        # commits last, after later closes were already published.
        (late_order,) = [uuid.UUID(i) for i in await confirm_orders(api, tenant, 1)]
        conn = await pool.connect()
        try:
            transaction = conn.transaction()
            await transaction.start()
            started = datetime.now(UTC)
            assert await conn.execute(_CLOSE_ORDER, late_order, tenant, started) == "UPDATE 1"
            payload = orjson.dumps({"orderId": str(late_order)}).decode()
            await conn.execute(_INSERT_EVENT, late_id, late_order, tenant, payload, started)
            await close_orders(api, tenant, 5)
            assert await relay.drain() == 5
            assert str(late_id) not in msg_ids(await stream_messages(broker.url))
            await transaction.commit()
        finally:
            await conn.close()

        assert await relay.drain() == 1
    finally:
        await publisher.close()
    rows = await outbox_rows(pool)
    others = [row for event_id, row in rows.items() if event_id != late_id]
    assert rows[late_id].created_at < min(row.created_at for row in others)
    published = [row.published_at for row in others]
    assert rows[late_id].published_at is not None
    assert None not in published
    assert rows[late_id].published_at > max(published)  # type: ignore[type-var]
    messages = await stream_messages(broker.url)
    assert len(messages) == 6
    assert msg_ids(messages)[-1] == str(late_id)


async def test_broker_stopped_mid_drain_then_restarted_loses_and_duplicates_nothing(
    pool: Pool, relay_database: str, broker: NatsServer
) -> None:
    ids = await seed_outbox(pool, 300)
    settings = relay_settings(
        relay_database, broker.url, relay_batch_size=20, relay_publish_timeout_ms=1000
    )
    stopped = asyncio.Event()

    async def stop_broker_at_send(count: int) -> None:
        if count == 70:  # in the middle of the fourth batch
            await asyncio.to_thread(broker.stop)
            stopped.set()

    publisher = CountingPublisher(JetStreamPublisher(settings), before_send=stop_broker_at_send)
    unavailable_before = metric("orders_api_relay_retried_total", reason="broker_unavailable")
    relay = Relay(pool, publisher, settings)
    async with running(relay):
        await asyncio.wait_for(stopped.wait(), timeout=10)
        # Longer than the publish timeout: the send in flight fails, the relay backs off.
        await asyncio.sleep(1.5)
        published_during_outage = await count_published(pool)
        assert 0 < published_during_outage < 300
        assert not publisher.connected
        await asyncio.to_thread(broker.start)

        async def all_published() -> bool:
            return await count_published(pool) == 300

        await wait_until(all_published, within=20, what="all rows published after the restart")

    messages = await stream_messages(broker.url)
    assert len(messages) == 300, "the stream lost or duplicated messages"
    assert set(msg_ids(messages)) == {str(event_id) for event_id in ids}
    rows = await outbox_rows(pool)
    assert all(row.dead_at is None for row in rows.values())
    # The outage is not charged to the rows: each was counted once, for its successful send.
    assert {row.attempts for row in rows.values()} == {1}
    assert len(publisher.attempted) > 300, "no send failed: the outage did not hit a batch"
    assert metric("orders_api_relay_retried_total", reason="broker_unavailable") > (
        unavailable_before
    )


async def test_poison_row_goes_dead_after_max_attempts_and_requeue_brings_it_back(
    pool: Pool, relay_database: str, broker: NatsServer
) -> None:
    settings = relay_settings(relay_database, broker.url, relay_max_attempts=3)
    # The stream refuses messages over 4 KiB: the broker rejects the poison row every time.
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    config = StreamConfig(name=STREAM, subjects=["orders.>"], duplicate_window=120)
    await js.add_stream(config, max_msg_size=4096)
    poison_id = (await seed_outbox(pool, 1, payload_bytes=8000))[0]
    good = await seed_outbox(pool, 20)
    dead_before = metric("orders_api_relay_dead_total")

    relay = Relay(pool, JetStreamPublisher(settings), settings)
    async with running(relay):

        async def poison_dead() -> bool:
            row = (await outbox_rows(pool))[poison_id]
            return row.dead_at is not None

        await wait_until(poison_dead, within=10, what="the poison row to be parked")
        assert await count_published(pool) == 20

        rows = await outbox_rows(pool)
        poison = rows[poison_id]
        assert poison.attempts == 3
        assert poison.published_at is None
        assert "message size exceeds maximum" in (poison.last_error or "")
        assert metric("orders_api_relay_dead_total") - dead_before == 1
        assert set(msg_ids(await stream_messages(broker.url))) == {str(i) for i in good}

        # The operator lifts the limit and re-queues the dead row with the CLI; a row that is
        # not dead is refused (exit status 1) and left alone.
        await js.update_stream(config, max_msg_size=-1)
        requeue = await asyncio.create_subprocess_exec(
            str(ORDERS_API),
            "outbox",
            "requeue",
            "--id",
            str(poison_id),
            "--id",
            str(good[0]),
            env=relay_env(relay_database),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await requeue.communicate()
        assert requeue.returncode == 1, err.decode()
        assert out.decode().strip() == "requeued 1 dead outbox row(s)"
        assert f"not dead (or unknown): {good[0]}" in err.decode()

        async def poison_published() -> bool:
            return (await outbox_rows(pool))[poison_id].published_at is not None

        await wait_until(poison_published, within=10, what="the re-queued row to be published")
    await nc.close()
    rows = await outbox_rows(pool)
    assert rows[poison_id].dead_at is None
    assert rows[poison_id].attempts == 1
    assert rows[good[0]].attempts == 1
    messages = await stream_messages(broker.url)
    assert set(msg_ids(messages)) == {str(i) for i in [*good, poison_id]}
    assert len(messages) == 21


async def test_new_rows_are_picked_up_quickly(
    pool: Pool, api: httpx.AsyncClient, relay_database: str, broker: NatsServer
) -> None:
    """A wake-up after the close commits reaches the relay far inside its 3 s poll."""
    poll_ms = 3000
    settings = relay_settings(relay_database, broker.url, relay_poll_interval_ms=poll_ms)
    relay = Relay(pool, JetStreamPublisher(settings), settings)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(broker.url)
    arrivals: asyncio.Queue[float] = asyncio.Queue()

    async def on_message(_msg: object) -> None:
        arrivals.put_nowait(time.perf_counter())

    await nc.subscribe("orders.closed", cb=on_message)
    latencies = []
    async with running(relay):

        async def listening() -> bool:
            return relay.listening

        await wait_until(listening, within=5, what="the relay to LISTEN")
        await asyncio.sleep(0.3)  # the relay is idle, waiting
        for order_id in await confirm_orders(api, tenant, 10):
            await close_order(api, tenant, order_id)
            closed = time.perf_counter()
            arrived = await asyncio.wait_for(arrivals.get(), timeout=poll_ms / 1000 + 5)
            latencies.append(arrived - closed)
            await asyncio.sleep(0.05)
    await nc.close()
    p50 = statistics.median(latencies)
    sys.stderr.write(f"close-to-delivery p50 {p50 * 1000:.1f} ms\n")
    assert p50 < 0.1, f"median pick-up {p50 * 1000:.0f} ms: NOTIFY did not wake the relay"
    assert max(latencies) < 1.0


async def test_retention_deletes_published_rows_older_than_the_period_in_batches(
    pool: Pool, relay_database: str
) -> None:
    now = datetime.now(UTC)
    old = await seed_outbox(pool, 2100, at=now - timedelta(hours=300))
    recent = await seed_outbox(pool, 5, at=now - timedelta(hours=300))
    pending = await seed_outbox(pool, 3, at=now - timedelta(hours=300))
    publish = "UPDATE outbox SET published_at = $2 WHERE id = ANY($1::uuid[])"
    async with pool.transaction() as conn:
        await conn.execute(publish, old, now - timedelta(hours=200))
        await conn.execute(publish, recent, now - timedelta(hours=100))
    settings = relay_settings(relay_database, relay_retention_hours=168)
    relay = Relay(pool, StdoutPublisher("orders"), settings)
    deleted_before = metric("orders_api_relay_deleted_total")
    assert await relay.purge_published() == 2100
    left = {row["id"] for row in await pool.fetch("SELECT id FROM outbox")}
    assert left == {*recent, *pending}
    assert metric("orders_api_relay_deleted_total") - deleted_before == 2100


async def test_relay_started_before_the_broker_waits_then_delivers(
    pool: Pool, relay_database: str, tmp_path: Path
) -> None:
    server = NatsServer(tmp_path)  # not started yet: nothing listens on its port
    ids = await seed_outbox(pool, 10)
    settings = relay_settings(relay_database, server.url)

    once = Relay(pool, JetStreamPublisher(settings), settings)
    started = time.monotonic()
    assert await once.run_once(connect_timeout=0.5) == 1  # cron-style run: report, exit
    assert time.monotonic() - started < 5
    assert await count_published(pool) == 0

    relay = Relay(pool, JetStreamPublisher(settings), settings)
    try:
        async with running(relay):
            # While it waits, the gauges still tell how far behind delivery is.
            async def gauges_refreshed() -> bool:
                return metric("orders_api_relay_pending_rows") == 10

            await wait_until(gauges_refreshed, within=10, what="the pending gauge")
            assert metric("orders_api_relay_oldest_pending_age_seconds") > 0.3
            assert metric("orders_api_relay_broker_connected") == 0
            assert await count_published(pool) == 0
            await asyncio.to_thread(server.start)

            async def all_published() -> bool:
                return await count_published(pool) == 10

            await wait_until(all_published, within=15, what="delivery once the broker is up")
        messages = await stream_messages(server.url)
        assert set(msg_ids(messages)) == {str(i) for i in ids}
        assert len(messages) == 10
    finally:
        server.stop()


async def test_sigterm_lets_the_batch_in_hand_finish(
    pool: Pool, relay_database: str, broker: NatsServer
) -> None:
    """stop() (what SIGTERM calls) during a batch: the batch is published and marked, no more."""
    await seed_outbox(pool, 100)
    settings = relay_settings(relay_database, broker.url, relay_batch_size=40)
    relay: Relay

    async def stop_during_second_batch(count: int) -> None:
        if count == 45:
            relay.stop()

    publisher = CountingPublisher(
        JetStreamPublisher(settings), before_send=stop_during_second_batch
    )
    relay = Relay(pool, publisher, settings)
    await asyncio.wait_for(relay.run(), timeout=15)
    assert len(publisher.acked) == 80  # two whole batches, the third never claimed
    rows = await outbox_rows(pool)
    assert sum(row.published_at is not None for row in rows.values()) == 80
    assert sum(row.attempts == 0 for row in rows.values()) == 20
