"""orders-api relay: outbox rows to the broker, at least once.

Delivery guarantee, and the steps that keep it:

1. Claim: one short transaction leases a batch of due rows (`attempts + 1`,
   `next_attempt_at = now + lease`) and commits before anything is sent.
   `FOR UPDATE SKIP LOCKED` gives concurrent relays disjoint rows; once committed, the
   lease keeps the rows away from every relay until it expires. No transaction is open
   while the broker is called.
2. Publish: each row is sent with `Nats-Msg-Id` = outbox id, and the relay waits for the ack
   (bounded by RELAY_PUBLISH_TIMEOUT_MS; the lease must outlast it).
3. Mark: a second short transaction sets `published_at` for the acked rows.

A crash between 2 and 3 leaves the lease to expire; the row is sent again under the same id
and JetStream keeps one copy (inside the stream's duplicate window). Rows are found by
`published_at IS NULL`, never a high-water mark, so a transaction that commits late is still
delivered. Broker outages are not charged to the rows: they go back to pending and the relay
backs off; only failures specific to a row count towards RELAY_MAX_ATTEMPTS and parking it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from orders_api.config import Settings
from orders_api.db import parse_database_url
from orders_api.errors import DATABASE_ERRORS
from orders_api.outbox import NOTIFY_CHANNEL, repository
from orders_api.outbox.models import OutboxEvent
from orders_api.outbox.publishers import (
    BrokerUnavailable,
    Publisher,
    build_publisher,
    is_transient,
)
from orders_api.pool import Pool

log = structlog.get_logger("orders_api.relay")

PUBLISHED = Counter("orders_api_relay_published_total", "Outbox rows delivered to the broker")
DUPLICATES = Counter(
    "orders_api_relay_duplicates_total", "Re-sends the broker recognised as duplicates"
)
RETRIED = Counter(
    "orders_api_relay_retried_total",
    "Failed attempts put back for a later retry",
    ["reason"],  # rejected: counted against the row; broker_unavailable: not counted
)
DEAD = Counter("orders_api_relay_dead_total", "Rows parked as dead after RELAY_MAX_ATTEMPTS")
DELETED = Counter("orders_api_relay_deleted_total", "Published rows deleted by retention")
PENDING_ROWS = Gauge("orders_api_relay_pending_rows", "Outbox rows neither published nor dead")
OLDEST_PENDING_AGE = Gauge(
    "orders_api_relay_oldest_pending_age_seconds", "Age of the oldest row not yet published"
)
BROKER_CONNECTED = Gauge("orders_api_relay_broker_connected", "1 while the broker is reachable")
DELIVERY_LAG = Histogram(
    "orders_api_relay_delivery_lag_seconds",
    "From the close transaction to the broker's ack",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)

RETENTION_BATCH = 1000
# Failures that pause the relay (and are retried), rather than end it.
_OUTAGES: tuple[type[BaseException], ...] = (BrokerUnavailable, *DATABASE_ERRORS)
STATS_INTERVAL_S = 5.0

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def backoff_delay(attempt: int, base_s: float, max_s: float, rand: Callable[[], float]) -> float:
    """Exponential in the attempt number, capped, with "equal jitter" (between half and all)."""
    capped = min(max_s, base_s * 2.0 ** max(0, attempt - 1))
    return capped / 2 + rand() * capped / 2


@dataclass(frozen=True, slots=True)
class BatchResult:
    claimed: int
    published: int
    retried: int
    dead: int
    unavailable: int


class Relay:
    """Drains the outbox into a publisher; `run` until `stop()`, or `drain` once."""

    def __init__(
        self,
        pool: Pool,
        publisher: Publisher,
        settings: Settings,
        *,
        clock: Clock = utc_now,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._settings = settings
        self._clock = clock
        self._rand = rand
        self._batch_size = settings.relay_batch_size
        self._lease = timedelta(seconds=settings.relay_lease_seconds)
        self._poll_s = settings.relay_poll_interval_ms / 1000
        self._base_s = settings.relay_backoff_base_ms / 1000
        self._max_s = settings.relay_backoff_max_ms / 1000
        self._max_attempts = settings.relay_max_attempts
        self._retention = timedelta(hours=settings.relay_retention_hours)
        self._retention_every_s = settings.relay_retention_interval_seconds
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._listening = False
        if settings.relay_lease_seconds <= settings.relay_publish_timeout_ms / 1000:
            log.warning(
                "RELAY_LEASE_SECONDS should exceed RELAY_PUBLISH_TIMEOUT_MS: a slow batch "
                "could be claimed twice"
            )

    @property
    def listening(self) -> bool:
        """True while the PostgreSQL LISTEN connection is up (new rows wake the relay at once)."""
        return self._listening

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run`."""
        self._stop.set()

    async def run(self) -> None:
        """Until `stop()`: wait for work, drain, back off while the broker or database is down."""
        # Connecting happens in the background: until it succeeds the loop below pauses (and
        # keeps the pending gauges and retention going), whether the broker is down or slow.
        connecting = asyncio.create_task(self._publisher.start(self._stop))
        await asyncio.wait({connecting}, timeout=self._settings.relay_publish_timeout_ms / 1000)
        # Behind PgBouncer in transaction mode no session outlives a transaction: poll only.
        pgbouncer = parse_database_url(self._settings.database_url).pgbouncer
        listener = None if pgbouncer else asyncio.create_task(self._listen())
        outages = 0
        next_stats = next_retention = 0.0
        try:
            while not self._stop.is_set():
                BROKER_CONNECTED.set(1 if self._publisher.connected else 0)
                # Kept up during outages too: that is when the pending gauges matter most.
                now_m = time.monotonic()
                if now_m >= next_stats:
                    next_stats = now_m + STATS_INTERVAL_S
                    await self._guarded(self.refresh_stats())
                if now_m >= next_retention:
                    next_retention = now_m + self._retention_every_s
                    await self._guarded(self.purge_published())
                try:
                    await self.drain()
                except _OUTAGES as exc:
                    outages += 1
                    delay = backoff_delay(outages, self._base_s, self._max_s, self._rand)
                    log.warning(
                        "relay paused",
                        error=_describe(exc),
                        retry_in_s=round(delay, 3),
                        consecutive=outages,
                    )
                    await self._pause(delay)
                    continue
                outages = 0
                await self._wait_for_work()
        finally:
            for task in (connecting, listener):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self._publisher.close()
            BROKER_CONNECTED.set(0)
            log.info("relay stopped")

    async def run_once(self, connect_timeout: float) -> int:
        """Drain what is due now, apply retention, exit: 0 when done, 1 when the broker was out."""
        try:
            if not await self._publisher.start(self._stop, give_up_after_s=connect_timeout):
                log.error("broker unreachable", timeout_s=connect_timeout)
                return 1
            try:
                published = await self.drain()
            except BrokerUnavailable as exc:
                log.error("broker unavailable", error=_describe(exc))
                return 1
            deleted = await self.purge_published()
            await self.refresh_stats()
            log.info("relay drained", published=published, deleted=deleted)
            return 0
        finally:
            await self._publisher.close()

    async def drain(self) -> int:
        """Publish due rows batch after batch until a batch comes back short; count delivered."""
        delivered = 0
        while not self._stop.is_set():
            self._wake.clear()
            if not self._publisher.connected:
                raise BrokerUnavailable("not connected to the broker")
            try:
                await self._publisher.prepare()
            except Exception as exc:
                if is_transient(exc):  # e.g. JetStream briefly without a leader
                    raise BrokerUnavailable(_describe(exc)) from exc
                raise
            result = await self.process_batch()
            delivered += result.published
            if result.unavailable:
                raise BrokerUnavailable(f"{result.unavailable} sends failed on the broker side")
            if result.claimed < self._batch_size:
                break
        return delivered

    async def process_batch(self) -> BatchResult:
        """Claim (short transaction), publish with no transaction open, record (short one)."""
        async with self._pool.transaction() as conn:
            events = await repository.claim_due(conn, self._clock(), self._batch_size, self._lease)
        if not events:
            return BatchResult(0, 0, 0, 0, 0)
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(self._publisher.publish(event) for event in events), return_exceptions=True
        )
        now = self._clock()
        delivered: list[OutboxEvent] = []
        rejected: list[tuple[OutboxEvent, BaseException]] = []
        unavailable: list[tuple[OutboxEvent, BaseException]] = []
        duplicates = 0
        for event, outcome in zip(events, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                (unavailable if is_transient(outcome) else rejected).append((event, outcome))
            else:
                delivered.append(event)
                duplicates += outcome
        failures = [self._failure(event, exc, now) for event, exc in rejected]
        async with self._pool.transaction() as conn:
            published = (
                await repository.mark_published(conn, [e.id for e in delivered], now)
                if delivered
                else 0
            )
            if failures:
                await repository.record_failures(conn, failures)
            if unavailable:
                await repository.release(
                    conn, [e.id for e, _ in unavailable], now, _describe(unavailable[0][1])
                )
        self._account(delivered, duplicates, failures, unavailable, now)
        dead = sum(1 for f in failures if f.dead_at is not None)
        log.info(
            "outbox batch",
            claimed=len(events),
            published=published,
            duplicates=duplicates,
            retried=len(failures) - dead,
            dead=dead,
            broker_unavailable=len(unavailable),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return BatchResult(len(events), published, len(failures) - dead, dead, len(unavailable))

    def _failure(self, event: OutboxEvent, exc: BaseException, now: datetime) -> repository.Failure:
        error = _describe(exc)
        if event.attempts >= self._max_attempts:
            log.error(
                "outbox row dead",
                outbox_id=str(event.id),
                attempt=event.attempts,
                error=error,
            )
            return repository.Failure(event.id, now, now, error)
        delay = backoff_delay(event.attempts, self._base_s, self._max_s, self._rand)
        retry_at = now + timedelta(seconds=delay)
        log.warning(
            "publish failed",
            outbox_id=str(event.id),
            attempt=event.attempts,
            error=error,
            retry_in_s=round(delay, 3),
        )
        return repository.Failure(event.id, retry_at, None, error)

    def _account(
        self,
        delivered: Sequence[OutboxEvent],
        duplicates: int,
        failures: Sequence[repository.Failure],
        unavailable: Sequence[tuple[OutboxEvent, BaseException]],
        now: datetime,
    ) -> None:
        PUBLISHED.inc(len(delivered))
        DUPLICATES.inc(duplicates)
        debug = logging.getLogger("orders_api.relay").isEnabledFor(logging.DEBUG)
        for event in delivered:
            DELIVERY_LAG.observe(max(0.0, (now - event.created_at).total_seconds()))
            if debug:
                log.debug("published", outbox_id=str(event.id), attempt=event.attempts)
        dead = sum(1 for f in failures if f.dead_at is not None)
        DEAD.inc(dead)
        RETRIED.labels("rejected").inc(len(failures) - dead)
        RETRIED.labels("broker_unavailable").inc(len(unavailable))
        if unavailable:
            log.warning(
                "broker unavailable",
                rows=len(unavailable),
                error=_describe(unavailable[0][1]),
                outbox_ids=[str(e.id) for e, _ in unavailable[:10]],
            )

    async def purge_published(self) -> int:
        """Retention: delete rows published before now - RELAY_RETENTION_HOURS, in batches."""
        cutoff = self._clock() - self._retention
        total = 0
        while True:
            async with self._pool.transaction() as conn:
                deleted = await repository.delete_published_before(conn, cutoff, RETENTION_BATCH)
            total += deleted
            if deleted < RETENTION_BATCH or self._stop.is_set():
                break
        if total:
            DELETED.inc(total)
            log.info("retention", deleted=total, cutoff=cutoff.isoformat())
        return total

    async def refresh_stats(self) -> repository.PendingStats:
        async with self._pool.transaction() as conn:
            stats = await repository.pending_stats(conn)
        PENDING_ROWS.set(stats.rows)
        oldest = stats.oldest_created_at
        OLDEST_PENDING_AGE.set(
            0 if oldest is None else max(0.0, (self._clock() - oldest).total_seconds())
        )
        return stats

    async def _guarded(self, work: Awaitable[object]) -> None:
        """Housekeeping must not stop delivery: a failure is logged and tried again later."""
        try:
            await work
        except DATABASE_ERRORS as exc:
            log.warning("housekeeping failed", error=_describe(exc))

    async def _wait_for_work(self) -> None:
        """Until a NOTIFY (PostgreSQL), stop, or the poll interval: whichever comes first."""
        await _first_of(self._wake, self._stop, wait_s=self._poll_s)

    async def _pause(self, delay: float) -> None:
        """Back off, but resume as soon as a lost broker connection is back."""
        was_connected = self._publisher.connected
        deadline = time.monotonic() + delay
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await _first_of(self._stop, wait_s=min(left, 0.1))
            if not was_connected and self._publisher.connected:
                return

    async def _listen(self) -> None:
        """LISTEN on a dedicated connection; polling covers any gap while it reconnects."""
        while not self._stop.is_set():
            conn = None
            try:
                conn = await self._pool.connect()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self._listening = True
                self._wake.set()  # whatever committed while nobody listened
                while not self._stop.is_set() and not lost.is_set():
                    await _first_of(self._stop, lost, wait_s=30)
                    if not self._stop.is_set() and not lost.is_set():
                        await conn.fetchval("SELECT 1")  # a dead socket shows up here
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("listen connection failed; polling meanwhile", error=_describe(exc))
            finally:
                self._listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
            await _first_of(self._stop, wait_s=max(self._poll_s, 1.0))

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()


async def _first_of(*events: asyncio.Event, wait_s: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _describe(exc: BaseException) -> str:
    text_ = str(exc)
    return f"{type(exc).__name__}: {text_}" if text_ else type(exc).__name__


def run_relay(settings: Settings, *, once: bool) -> int:
    """The `orders-api relay` command."""
    if settings.relay_metrics_port > 0:
        start_http_server(settings.relay_metrics_port, addr=settings.relay_metrics_host)
    return asyncio.run(_relay_main(settings, once=once))


async def _relay_main(settings: Settings, *, once: bool) -> int:
    pool = Pool.from_settings("relay", settings, max_size=2)
    relay = Relay(pool, build_publisher(settings), settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, relay.stop)
    log.info(
        "relay starting",
        once=once,
        publisher="jetstream" if settings.nats_url else "stdout",
        batch_size=settings.relay_batch_size,
    )
    try:
        if once:
            return await relay.run_once(connect_timeout=settings.relay_publish_timeout_ms / 1000)
        await relay.run()
        return 0
    finally:
        await pool.close()


def requeue(settings: Settings, ids: Collection[uuid.UUID] | None) -> int:
    """The `orders-api outbox requeue` command: dead rows get a fresh attempt budget."""
    return asyncio.run(_requeue_main(settings, ids))


async def _requeue_main(settings: Settings, ids: Collection[uuid.UUID] | None) -> int:
    pool = Pool.from_settings("relay", settings, max_size=1)
    try:
        async with pool.transaction() as conn:
            requeued = await repository.requeue_dead(conn, utc_now(), ids)
            if requeued:
                await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    finally:
        await pool.close()
    log.info("requeued dead outbox rows", count=len(requeued), ids=[str(i) for i in requeued])
    sys.stdout.write(f"requeued {len(requeued)} dead outbox row(s)\n")
    if ids is not None and len(requeued) < len(set(ids)):
        missing = sorted(str(i) for i in set(ids) - set(requeued))
        sys.stderr.write(f"not dead (or unknown): {', '.join(missing)}\n")
        return 1
    return 0
