"""Where the relay sends events: NATS JetStream, or JSON lines on stdout (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import IO, Protocol

import nats
import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from orders_api.config import Settings
from orders_api.outbox.models import OutboxEvent, subject_for

log = structlog.get_logger("orders_api.relay")

HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_EVENT_TYPE = "Event-Type"
HEADER_TENANT_ID = "Tenant-Id"
HEADER_ORDER_ID = "Order-Id"


class BrokerUnavailable(Exception):
    """The broker cannot take messages right now; nothing is wrong with the rows."""


class Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    async def start(self, stop: asyncio.Event, give_up_after_s: float | None = None) -> bool:
        """Connect; False when `stop` was set or `give_up_after_s` passed first."""
        ...

    async def prepare(self) -> None:
        """Make sure the destination exists (once per connection)."""
        ...

    async def publish(self, event: OutboxEvent) -> bool:
        """Return once the broker has the event; True when it reported a duplicate."""
        ...

    async def close(self) -> None: ...


_TRANSIENT: tuple[type[BaseException], ...] = (
    BrokerUnavailable,
    TimeoutError,  # asyncio.TimeoutError and nats.errors.TimeoutError included
    OSError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
)


def is_transient(exc: BaseException) -> bool:
    """A broker-side or connection failure, not the row's fault: it is not charged to the row.

    Anything else (the stream rejects the message, the payload exceeds the server's limit)
    counts as an attempt, and enough of them park the row as dead.
    """
    return isinstance(exc, _TRANSIENT)


def message_headers(event: OutboxEvent) -> dict[str, str]:
    return {
        HEADER_MSG_ID: str(event.id),
        HEADER_EVENT_TYPE: event.event_type,
        HEADER_TENANT_ID: event.tenant_id,
        HEADER_ORDER_ID: str(event.order_id),
    }


class StdoutPublisher:
    """One JSON line per event on stdout: lets `make run` users watch events without a broker."""

    def __init__(self, subject_prefix: str, out: IO[str] | None = None) -> None:
        self._prefix = subject_prefix
        self._out = out

    @property
    def connected(self) -> bool:
        return True

    async def start(self, stop: asyncio.Event, give_up_after_s: float | None = None) -> bool:
        return True

    async def prepare(self) -> None:
        return None

    async def publish(self, event: OutboxEvent) -> bool:
        out = self._out or sys.stdout
        line = orjson.dumps(
            {
                "id": str(event.id),
                "subject": subject_for(event.event_type, self._prefix),
                "eventType": event.event_type,
                "tenantId": event.tenant_id,
                "orderId": str(event.order_id),
                "payload": event.payload,
            }
        )
        out.write(line.decode() + "\n")
        out.flush()
        return False

    async def close(self) -> None:
        return None


class JetStreamPublisher:
    """Publishes to a JetStream stream and waits for each ack.

    The client reconnects forever on its own; while it is disconnected the relay stops
    claiming rows. `Nats-Msg-Id` is the outbox id, so a re-send inside the stream's duplicate
    window (a crash between ack and mark, an ack lost in an outage) is stored only once.
    """

    def __init__(self, settings: Settings) -> None:
        # One server or a comma-separated list (a cluster): the client fails over between them.
        self._servers = [url.strip() for url in settings.nats_url.split(",") if url.strip()]
        self._stream = settings.relay_stream
        self._replicas = settings.relay_stream_replicas
        self._prefix = settings.relay_subject_prefix
        self._subjects = [
            subject.strip()
            for subject in (settings.relay_stream_subjects or f"{self._prefix}.>").split(",")
            if subject.strip()
        ]
        self._timeout = settings.relay_publish_timeout_ms / 1000
        self._duplicate_window = settings.relay_duplicate_window_seconds
        self._reconnect_wait = settings.relay_reconnect_wait_ms / 1000
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self._closing = False
        self._last_error: tuple[str, float] = ("", 0.0)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def start(self, stop: asyncio.Event, give_up_after_s: float | None = None) -> bool:
        connecting = asyncio.create_task(
            nats.connect(
                self._servers,
                name="orders-api-relay",
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=self._reconnect_wait,
                connect_timeout=max(1, int(self._timeout)),
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        )
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait(
                {connecting, stopping}, timeout=give_up_after_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting
            return False
        self._nc = connecting.result()
        self._js = self._nc.jetstream(timeout=self._timeout)
        log.info(
            "broker connected",
            servers=[_redacted(url) for url in self._servers],
            stream=self._stream,
        )
        return True

    async def prepare(self) -> None:
        if self._stream_ready:
            return
        if self._js is None or not self.connected:
            raise BrokerUnavailable("not connected to NATS")
        try:
            await self._js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(
                StreamConfig(
                    name=self._stream,
                    subjects=self._subjects,
                    storage=StorageType.FILE,
                    duplicate_window=self._duplicate_window,
                    num_replicas=self._replicas,
                )
            )
            log.info(
                "stream created",
                stream=self._stream,
                subjects=self._subjects,
                replicas=self._replicas,
            )
        self._stream_ready = True

    async def publish(self, event: OutboxEvent) -> bool:
        if self._js is None:
            raise BrokerUnavailable("not connected to NATS")
        try:
            ack = await self._js.publish(
                subject_for(event.event_type, self._prefix),
                orjson.dumps(event.payload),
                timeout=self._timeout,
                stream=self._stream,
                headers=message_headers(event),
            )
        except nats.js.errors.NoStreamResponseError:
            self._stream_ready = False  # deleted, or a fresh server: create it again
            raise
        return bool(ack.duplicate)

    async def close(self) -> None:
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    async def _on_error(self, error: Exception) -> None:
        # While the broker is down the client reports each reconnect attempt: say it once a minute.
        message = repr(error)
        last, at = self._last_error
        now = time.monotonic()
        if message != last or now - at > 60:
            self._last_error = (message, now)
            log.warning("broker error", error=message)

    async def _on_disconnected(self) -> None:
        if self._closing:
            log.info("broker connection closed")
        else:
            log.warning("broker disconnected")

    async def _on_reconnected(self) -> None:
        self._stream_ready = False
        self._last_error = ("", 0.0)
        log.info("broker reconnected")


def _redacted(url: str) -> str:
    """nats://user:secret@host -> nats://user:***@host"""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def build_publisher(settings: Settings) -> Publisher:
    if settings.nats_url:
        return JetStreamPublisher(settings)
    return StdoutPublisher(settings.relay_subject_prefix)
