"""A real `orders-api serve --workers 2` process per backend, on the session's database."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.helpers import PROJECT_ROOT, free_port


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    pid: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def start_server(
    database_url: str, workers: int = 2, **env: str
) -> tuple[Server, subprocess.Popen[bytes]]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(PROJECT_ROOT / ".venv/bin/orders-api"),
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        env={**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING", **env},
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )
    server = Server("127.0.0.1", port, process.pid)
    try:
        wait_until_healthy(server.base_url, process)
    except BaseException:
        stop_server(process)
        raise
    return server, process


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def server(database_url: str) -> Iterator[Server]:
    """`orders-api serve --workers 2`, as the README starts it, on this backend's database."""
    running, process = start_server(database_url)
    yield running
    stop_server(process)
