"""Transactional outbox: rows written by the close transaction, delivered by the relay."""

from __future__ import annotations

# PostgreSQL channel the close transaction notifies on commit; the relay LISTENs on it.
NOTIFY_CHANNEL = "orders_outbox"
