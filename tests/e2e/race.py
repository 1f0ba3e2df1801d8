"""Fire HTTP requests at one instant: connections are opened first, then one barrier
releases every request, so the requests really overlap on the server's workers."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def serving_pids(port: int, client_ports: set[int]) -> list[int]:
    """The server-side process of each of our connections, to prove spread."""
    return [
        connection.pid
        for connection in psutil.net_connections(kind="tcp4")
        if connection.pid is not None
        and connection.status == psutil.CONN_ESTABLISHED
        and connection.laddr
        and connection.laddr.port == port
        and connection.raddr
        and connection.raddr.port in client_ports
    ]


def open_spread(
    host: str, port: int, count: int, workers: int, timeout: float
) -> list[http.client.HTTPConnection]:
    """Open `count` connections that land on at least `workers` server processes."""
    for _ in range(50):
        connections = [
            http.client.HTTPConnection(host, port, timeout=timeout) for _ in range(count)
        ]
        for connection in connections:
            connection.connect()
        if workers <= 1:
            return connections
        time.sleep(0.05)  # let the workers accept
        ports = {connection.sock.getsockname()[1] for connection in connections}
        if len(set(serving_pids(port, ports))) >= workers:
            return connections
        for connection in connections:
            connection.close()
        time.sleep(0.2)
    raise AssertionError(f"could not spread {count} connections over {workers} workers")


def fire_together(
    host: str, port: int, calls: list[Call], workers: int = 2, timeout: float = 30
) -> list[Answer]:
    """Send `calls` at once over connections spread on at least `workers` server processes."""
    connections = open_spread(host, port, len(calls), min(workers, len(calls)), timeout)
    barrier = threading.Barrier(len(calls))
    answers: list[Answer | BaseException | None] = [None] * len(calls)

    def send(index: int) -> None:
        call, connection = calls[index], connections[index]
        try:
            barrier.wait()
            connection.request(call.method, call.path, body=call.body, headers=call.headers)
            response = connection.getresponse()
            answers[index] = Answer(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        except BaseException as exc:  # reported to the test below
            answers[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failures = [answer for answer in answers if not isinstance(answer, Answer)]
    if failures:
        raise AssertionError(f"{len(failures)} requests failed: {failures[:3]}")
    return [answer for answer in answers if isinstance(answer, Answer)]
