"""Real `orders-api serve` processes (fuzz, hardening, fault and e2e tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import PROJECT_ROOT, free_port

BIN = Path(sys.executable).parent
ORDERS_API = str(BIN / "orders-api")


@dataclass
class LiveServer:
    """One `orders-api serve` process group; its stderr goes to a file the test can show."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    host = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def worker_pids(self) -> list[int]:
        """The uvicorn workers: children of the serve process running multiprocessing.spawn."""
        return [
            pid
            for pid in children_of(self.process.pid)
            if b"multiprocessing.spawn" in _cmdline(pid)
            and b"resource_tracker" not in _cmdline(pid)
        ]

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (graceful), then SIGKILL of the whole group if it does not end in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return int(self.process.returncode)


def children_of(pid: int) -> list[int]:
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return sorted(children)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def server_env(database_url: str | None, **env: str) -> dict[str, str]:
    """The environment of an `orders-api` process: DATABASE_URL, or with None none at all (the
    embedded PostgreSQL of its working folder), and nothing inherited that would redirect it."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "EMBEDDED_PG_DIR", "MIGRATE_ON_START")
    }
    environment["LOG_LEVEL"] = "WARNING"
    if database_url is not None:
        environment["DATABASE_URL"] = database_url
    environment.update(env)
    return environment


def start_server(
    database_url: str | None,
    log_dir: Path,
    *,
    workers: int = 2,
    timeout: float = 60,
    cwd: Path = PROJECT_ROOT,
    **env: str,
) -> LiveServer:
    """`orders-api serve --workers N` on a free port, as the README runs it; waits for health.

    With `database_url` None the server runs on the embedded PostgreSQL in `cwd`/.data/pg.
    """
    port = free_port()
    metrics_dir = log_dir / f"metrics-{port}"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    environment = server_env(database_url, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), **env)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [ORDERS_API, "serve", "--port", str(port), "--workers", str(workers)],
            env=environment,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LiveServer(process, port, log_path)
    try:
        wait_until_healthy(server, timeout)
    except BaseException:
        server.stop(timeout=5)
        raise
    return server


def wait_until_healthy(server: LiveServer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.base_url, timeout=1) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{server.log_tail()}")
            try:
                if http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{server.log_tail()}")


@contextmanager
def running_server(
    database_url: str | None, log_dir: Path, **kwargs: str | int | Path
) -> Iterator[LiveServer]:
    server = start_server(database_url, log_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def migrate(database_url: str) -> None:
    subprocess.run(
        [ORDERS_API, "migrate"],
        env=server_env(database_url),
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
