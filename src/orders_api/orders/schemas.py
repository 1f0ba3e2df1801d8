"""Request and response DTOs: inputs are validated strictly; outputs document the JSON we send."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

MAX_TOTAL_CENTS = 2_147_483_647

OrderStatus = Literal["draft", "confirmed", "closed"]


class EmptyRequest(BaseModel):
    """Create and close define no fields yet: the body is `{}` or empty."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ConfirmOrderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    totalCents: int = Field(ge=0, le=MAX_TOTAL_CENTS)


class CreatedOrder(BaseModel):
    id: UUID
    tenantId: str
    status: Literal["draft"]
    version: Literal[1]
    createdAt: datetime


class ConfirmedOrder(BaseModel):
    id: UUID
    status: Literal["confirmed"]
    version: int
    totalCents: int


class ClosedOrder(BaseModel):
    id: UUID
    status: Literal["closed"]
    version: int


class Order(BaseModel):
    id: UUID
    tenantId: str
    status: OrderStatus
    version: int
    totalCents: int | None
    createdAt: datetime
    updatedAt: datetime


class OrderPage(BaseModel):
    items: list[Order]
    nextCursor: str | None
