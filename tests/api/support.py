"""Small drivers for the API tests: create / confirm / close an order, read rows back."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import httpx

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


async def order_row(db: asyncpg.Pool, order_id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM orders WHERE id = $1", uuid.UUID(order_id))
    assert row is not None
    return row


async def outbox_rows(db: asyncpg.Pool, order_id: str) -> list[dict[str, Any]]:
    """The order's outbox rows as dicts, the jsonb payload decoded."""
    rows = await db.fetch("SELECT * FROM outbox WHERE order_id = $1", uuid.UUID(order_id))
    return [{**row, "payload": json.loads(row["payload"])} for row in rows]
