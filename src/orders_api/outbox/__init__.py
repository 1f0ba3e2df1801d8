"""Transactional outbox: rows written by the close transaction, delivered by the relay."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

# PostgreSQL channel the relay LISTENs on; a NOTIFY there wakes it before its next poll.
NOTIFY_CHANNEL = "orders_outbox"

log = structlog.get_logger("orders_api.outbox")


class RelayWakeUp:
    """Sends the relay's wake-up after closes commit, at most one at a time per process.

    A close that commits while a wake-up is in flight asks for one more after it, so the
    relay always hears of the last close; polling (RELAY_POLL_INTERVAL_MS) is the floor when
    a wake-up fails or nobody listens.
    """

    def __init__(self, send: Callable[[], Awaitable[object]]) -> None:
        self._send = send
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def __call__(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._send()
            except Exception as exc:  # the relay's polling covers a lost wake-up
                log.warning("relay wake-up failed", error=type(exc).__name__)
            if not self._again:
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
