"""Request and response DTOs: inputs are validated strictly; outputs document the JSON we send."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_TOTAL_CENTS = 2_147_483_647

OrderStatus = Literal["draft", "confirmed", "closed"]


class EmptyRequest(BaseModel):
    """Create and close define no fields yet: the body is `{}` or empty."""

    model_config = ConfigDict(extra="forbid", strict=True)


# Each operation names its own body in /openapi.json, so that generated clients get these
# names and a field added to one body later does not change the other's type.
class CreateOrderRequest(EmptyRequest):
    """No fields are defined yet: send `{}` or no body."""


class CloseOrderRequest(EmptyRequest):
    """No fields are defined yet: send `{}` or no body."""


def _integral(value: object) -> object:
    """A JSON number with no fraction (`12.0`, `1e2`) is an integer, as in JSON Schema."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class ConfirmOrderRequest(BaseModel):
    """The total of the order, in cents."""

    model_config = ConfigDict(extra="forbid", strict=True)

    totalCents: Annotated[int, BeforeValidator(_integral)] = Field(ge=0, le=MAX_TOTAL_CENTS)


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
