"""/healthz and /readyz: the process is up; the database answers, or 503 unavailable quickly."""

from __future__ import annotations

import time

import httpx
from asgi_lifespan import LifespanManager

from orders_api.app import create_app
from tests.helpers import free_port, make_settings


async def test_ready_when_the_database_answers(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_not_ready_while_the_database_is_unreachable() -> None:
    # Nothing listens on this port: PostgreSQL is "down" from the start.
    url = f"postgresql://orders@127.0.0.1:{free_port()}/orders"
    async with LifespanManager(create_app(make_settings(url))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            started = time.monotonic()
            ready = await client.get("/readyz")
            elapsed = time.monotonic() - started
            health = await client.get("/healthz")
            order = await client.get("/orders", headers={"X-Tenant-Id": "t"})
    assert ready.status_code == 503
    assert ready.json() == {"code": "unavailable", "message": "database unreachable"}
    assert elapsed < 3
    # The process itself is fine, and requests that need the database get 503, not 500.
    assert health.status_code == 200
    assert order.status_code == 503
    assert order.json()["code"] == "unavailable"
