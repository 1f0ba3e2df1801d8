"""Client-side load for the fault tests, with a log of every answer, and the database's view."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import orjson


@dataclass
class Answer:
    step: str  # create | confirm | close
    key: str
    status: int | None  # None: no HTTP answer (connection dropped, timeout)
    body: dict[str, Any]
    error: str = ""
    seconds: float = 0.0
    at: float = field(default_factory=time.monotonic)  # when the answer came


@dataclass
class ClientLog:
    answers: list[Answer] = field(default_factory=list)

    def by_status(self, step: str = "create") -> dict[int | None, int]:
        counts: dict[int | None, int] = {}
        for answer in self.answers:
            if answer.step == step:
                counts[answer.status] = counts.get(answer.status, 0) + 1
        return counts

    def ok(self, step: str) -> list[Answer]:
        return [a for a in self.answers if a.step == step and a.status in (200, 201)]


async def call(
    http: httpx.AsyncClient, log: ClientLog, step: str, key: str, method: str, url: str,
    **kwargs: Any,
) -> Answer:  # fmt: skip
    started = time.monotonic()
    try:
        response = await http.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        answer = Answer(step, key, None, {}, type(exc).__name__, time.monotonic() - started)
    else:
        try:
            body = response.json()
        except ValueError:
            body = {"raw": response.text[:200]}
        answer = Answer(step, key, response.status_code, body, "", time.monotonic() - started)
    log.answers.append(answer)
    return answer


async def run_load(
    base_url: str,
    tenant: str,
    seconds: float,
    *,
    concurrency: int = 6,
    lifecycle: bool = False,
    during: Callable[[], Any] | None = None,
) -> ClientLog:
    """`concurrency` clients create orders (and with lifecycle, confirm and close each) for
    `seconds`, while `during` (a coroutine function) runs the fault."""
    log = ClientLog()
    deadline = time.monotonic() + seconds
    headers = {"X-Tenant-Id": tenant}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=15) as http:
            while time.monotonic() < deadline:
                key = uuid.uuid4().hex
                created = await call(
                    http, log, "create", key, "POST", "/orders", headers={"Idempotency-Key": key}
                )
                if created.status is None or created.status >= 500:
                    await asyncio.sleep(0.05)
                if not lifecycle or created.status != 201:
                    continue
                order = f"/orders/{created.body['id']}"
                confirmed = await call(
                    http, log, "confirm", key, "PATCH", f"{order}/confirm",
                    json={"totalCents": 100}, headers={"If-Match": '"1"'},
                )  # fmt: skip
                if confirmed.status == 200:
                    await call(http, log, "close", key, "POST", f"{order}/close")

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    if during is not None:
        await during()
    await asyncio.gather(*tasks)
    return log


async def retry_creates(base_url: str, tenant: str, log: ClientLog, keys: list[str]) -> None:
    """After the fault, a careful client retries what it got no 2xx for, with the same key."""
    async with httpx.AsyncClient(base_url=base_url, timeout=15) as http:
        for key in keys:
            for _ in range(20):
                answer = await call(
                    http, log, "create", key, "POST", "/orders",
                    headers={"X-Tenant-Id": tenant, "Idempotency-Key": key},
                )  # fmt: skip
                if answer.status in (200, 201):
                    break
                await asyncio.sleep(0.25)


@dataclass
class Stored:
    orders: dict[str, dict[str, Any]]  # id -> row
    keys: dict[str, str]  # idempotency key -> order id it answered
    closed_events: dict[str, int]  # order id -> number of orders.closed rows


async def stored_state(database_url: str, tenant: str) -> Stored:
    conn = await asyncpg.connect(database_url)
    try:
        order_rows = await conn.fetch(
            "SELECT id, status, version FROM orders WHERE tenant_id = $1", tenant
        )
        key_rows = await conn.fetch(
            "SELECT key, response_json::text AS response FROM idempotency_keys "
            "WHERE tenant_id = $1",
            tenant,
        )
        event_rows = await conn.fetch(
            "SELECT order_id FROM outbox WHERE tenant_id = $1 AND event_type = 'orders.closed'",
            tenant,
        )
    finally:
        await conn.close()
    events: dict[str, int] = {}
    for row in event_rows:
        events[str(row["order_id"])] = events.get(str(row["order_id"]), 0) + 1
    assert len({r["id"] for r in order_rows}) == len(order_rows)
    return Stored(
        orders={str(r["id"]): {"status": r["status"], "version": r["version"]} for r in order_rows},
        keys={r["key"]: str(orjson.loads(r["response"])["id"]) for r in key_rows},
        closed_events=events,
    )


def assert_nothing_half_written(stored: Stored) -> None:
    """Every order has the idempotency record that answered it and vice versa; every closed
    order has exactly one orders.closed outbox row and no other order has one."""
    answered = list(stored.keys.values())
    assert len(answered) == len(set(answered)), "two keys answered with one order"
    assert set(answered) == set(stored.orders), (
        f"orders without a key: {set(stored.orders) - set(answered)}; "
        f"keys without an order: {set(answered) - set(stored.orders)}"
    )
    closed = {oid for oid, row in stored.orders.items() if row["status"] == "closed"}
    assert set(stored.closed_events) == closed, "closed orders and outbox rows differ"
    assert all(count == 1 for count in stored.closed_events.values())


def assert_every_success_exists_once(log: ClientLog, stored: Stored) -> None:
    """Every create answered 2xx names an order that is in the table, once, under its key."""
    for answer in log.ok("create"):
        assert stored.keys.get(answer.key) == answer.body["id"], answer
        assert answer.body["id"] in stored.orders, answer
    for answer in log.ok("confirm"):
        assert stored.orders[answer.body["id"]]["status"] in ("confirmed", "closed"), answer
    for answer in log.ok("close"):
        assert stored.orders[answer.body["id"]]["status"] == "closed", answer
        assert stored.closed_events[answer.body["id"]] == 1, answer
