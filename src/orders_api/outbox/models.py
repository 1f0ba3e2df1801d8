"""What the relay reads from an outbox row and how it names the message."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    id: uuid.UUID
    event_type: str
    order_id: uuid.UUID
    tenant_id: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int


def subject_for(event_type: str, prefix: str) -> str:
    """The event type's domain part (before the first dot) replaced by the prefix.

    Under prefix `acme.orders`, `orders.closed` becomes `acme.orders.closed`.
    """
    name = event_type.split(".", 1)[-1]
    return f"{prefix}.{name}"
