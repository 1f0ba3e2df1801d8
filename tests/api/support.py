"""Small drivers for the API tests: create / confirm / close an order, read rows back."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncEngine

from orders_api.db import orders, outbox
from tests.helpers import auth


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the error shape {code, message[, details]} and nothing else."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) <= {"code", "message", "details"}
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    if "details" in body:
        assert isinstance(body["details"], dict)
    return body


async def create_order(client: httpx.AsyncClient, tenant: str) -> dict[str, Any]:
    response = await client.post("/orders", headers=auth(tenant, Idempotency_Key=str(uuid.uuid4())))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def confirm_order(
    client: httpx.AsyncClient, tenant: str, order_id: str, total_cents: int = 1250
) -> dict[str, Any]:
    response = await client.patch(
        f"/orders/{order_id}/confirm",
        headers=auth(tenant, If_Match="*"),
        json={"totalCents": total_cents},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def confirmed_order(
    client: httpx.AsyncClient, tenant: str, total_cents: int = 1250
) -> dict[str, Any]:
    order = await create_order(client, tenant)
    return await confirm_order(client, tenant, order["id"], total_cents)


async def close_order(client: httpx.AsyncClient, tenant: str, order_id: str) -> dict[str, Any]:
    response = await client.post(f"/orders/{order_id}/close", headers=auth(tenant))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def get_order(client: httpx.AsyncClient, tenant: str, order_id: str) -> dict[str, Any]:
    response = await client.get(f"/orders/{order_id}", headers=auth(tenant))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def order_row(engine: AsyncEngine, order_id: str) -> Row[Any]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(orders).where(orders.c.id == uuid.UUID(order_id)))).one()
    return row


async def outbox_rows(engine: AsyncEngine, order_id: str) -> list[Row[Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(select(outbox).where(outbox.c.order_id == uuid.UUID(order_id)))
        return list(result.all())
