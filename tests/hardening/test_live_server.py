"""What only a real `orders-api serve --workers 2` shows: early 413, header floods, metrics
summed over workers, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import auth
from tests.live import BIN, LiveServer, running_server, start_server


@pytest.fixture(scope="module")
def server(
    fresh_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    with running_server(fresh_database(), tmp_path_factory.mktemp("live")) as live:
        yield live


def exchange(server: LiveServer, request: bytes, timeout: float = 5) -> tuple[bytes, float]:
    """Send raw bytes; read until the server has sent one whole response (or closed)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                if len(rest) >= length:
                    return data, time.monotonic() - started
            chunk = sock.recv(65536)
            if not chunk:
                return data, time.monotonic() - started
            data += chunk


def status_and_body(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def test_a_declared_oversized_body_is_refused_without_waiting_for_it(server: LiveServer) -> None:
    request = (
        b"POST /orders HTTP/1.1\r\nHost: test\r\nX-Tenant-Id: t-413\r\nIdempotency-Key: k\r\n"
        b'Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{"a":'
    )
    raw, elapsed = exchange(server, request, timeout=5)
    status, body = status_and_body(raw)
    assert status == 413
    assert body["code"] == "payload_too_large"
    assert set(body) == {"code", "message"}
    # The answer came while 1,999,995 bytes were still owed: nothing waited for the body.
    assert elapsed < 1.5


def test_a_chunked_body_is_cut_off_at_the_limit(server: LiveServer) -> None:
    chunk = b" " * 65536
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /orders HTTP/1.1\r\nHost: test\r\nX-Tenant-Id: t-chunk\r\nIdempotency-Key: k\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
        )
        sent = 0
        try:
            while sent < 3 * 1024 * 1024:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed while we were still sending
        data = b""
        try:
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                part = sock.recv(65536)
                if not part:
                    break
                data += part
        except OSError:
            pass
    status, body = status_and_body(data)
    assert status == 413
    assert body["code"] == "payload_too_large"
    with httpx.Client(base_url=server.base_url) as http:
        # Nothing was stored for the key: it creates now.
        response = http.post("/orders", headers=auth("t-chunk", Idempotency_Key="k"))
        assert response.status_code == 201


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 1_000_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(20_000)),
    ],
    ids=["one-1MB-header", "20000-headers"],
)
def test_header_floods_get_the_error_shape(server: LiveServer, headers: bytes) -> None:
    # uvicorn's httptools parser has no size limit of its own: the app's limit answers.
    request = b"GET /orders HTTP/1.1\r\nHost: test\r\nX-Tenant-Id: t\r\n" + headers + b"\r\n"
    raw, _ = exchange(server, request, timeout=10)
    status, body = status_and_body(raw)
    assert status == 400
    assert body == {
        "code": "validation_error",
        "message": "request headers are larger than 16384 bytes",
        "details": {"reason": "headers_too_large"},
    }
    with httpx.Client(base_url=server.base_url) as http:
        assert http.get("/healthz").status_code == 200


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_are_summed_over_all_workers(server: LiveServer) -> None:
    tenant = "t-metrics"
    with httpx.Client(base_url=server.base_url) as http:
        before = _samples(http.get("/metrics").text)
        creates = [
            http.post("/orders", headers=auth(tenant, Idempotency_Key=f"k{i}")) for i in range(6)
        ]
        replay = http.post("/orders", headers=auth(tenant, Idempotency_Key="k0"))
        conflict = http.post(
            "/orders", headers=auth(tenant, Idempotency_Key="k0"), json={"other": True}
        )
        missing = http.get(f"/orders/{creates[0].json()['id']}x", headers=auth(tenant))
        scrape = http.get("/metrics")
    assert [r.status_code for r in creates] == [201] * 6
    assert (replay.status_code, conflict.status_code, missing.status_code) == (200, 409, 404)
    assert scrape.headers["content-type"].startswith("text/plain")
    after = _samples(scrape.text)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests = "orders_api_http_requests_total"
    assert delta(requests, method="POST", route="/orders", status="201") == 6
    assert delta(requests, method="POST", route="/orders", status="200") == 1
    assert delta(requests, method="POST", route="/orders", status="409") == 1
    assert delta(requests, method="GET", route="/orders/{order_id}", status="404") == 1
    latency = "orders_api_http_request_duration_seconds_count"
    assert delta(latency, method="POST", route="/orders") == 8
    idempotency = "orders_api_idempotency_total"
    assert delta(idempotency, operation="create", outcome="created") == 6
    assert delta(idempotency, operation="create", outcome="replayed") == 1
    assert delta(idempotency, operation="create", outcome="conflict") == 1

    # Requests are spread over both workers, yet one scrape sees them all (multiprocess mode),
    # and no connection stays checked out once they are answered.
    def pool_gauge(state: str) -> float:
        return after[
            ("orders_api_db_pool_connections", frozenset({("pool", "api"), ("state", state)}))
        ]

    assert pool_gauge("open") >= 1
    assert pool_gauge("in_use") == 0


async def orders_of(database_url: str, tenant: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id FROM orders WHERE tenant_id = $1", tenant)
    finally:
        await conn.close()
    return [str(row["id"]) for row in rows]


def test_sigterm_lets_an_in_flight_request_finish(database_url: str, tmp_path: Path) -> None:
    tenant = f"t-drain-{uuid.uuid4().hex[:8]}"
    server = start_server(database_url, tmp_path)
    try:
        body = b"{}" + b" " * 98
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            # Half a request: headers and part of the body; the app is now waiting for the rest.
            sock.sendall(
                b"POST /orders HTTP/1.1\r\nHost: test\r\nX-Tenant-Id: %s\r\n"
                b"Idempotency-Key: drain\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (tenant.encode(), len(body)) + body[:10]
            )
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(1.5)
            # Still shutting down, not gone: it waits for the request in flight.
            assert server.process.poll() is None
            sock.sendall(body[10:])
            raw = b""
            while b"}" not in raw:
                part = sock.recv(65536)
                if not part:
                    break
                raw += part
        status, created = status_and_body(raw)
        assert status == 201
        assert created["tenantId"] == tenant
        assert server.process.wait(timeout=25) == 0
    finally:
        server.stop(timeout=5)
    # The order really committed before the process ended.
    assert asyncio.run(orders_of(database_url, tenant)) == [created["id"]]


def test_the_image_healthcheck_command_passes_against_a_live_server(server: LiveServer) -> None:
    from tests.hardening.test_deployment import healthcheck_command

    command = healthcheck_command()
    run = subprocess.run(
        [str(BIN / "python"), *command[1:]],
        env={"PORT": str(server.port)},
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
