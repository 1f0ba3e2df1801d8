"""What both benchmarks share: a fresh database, a real server, wrk and pgbench runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA = BENCH / "lua"
RESULTS = BENCH / "results"
VENV_BIN = ROOT / ".venv" / "bin"
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
WRK_THREADS = 2


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def database_url(name: str) -> str:
    url = make_url(PG_URL).set(drivername="postgresql", database=name)
    return url.render_as_string(hide_password=False)


async def recreate_database(name: str) -> None:
    """Drop and re-create one of *our* databases (the name must start with orders_bench)."""
    if not name.startswith("orders_bench"):
        raise ValueError(f"refusing to recreate {name!r}: bench databases are orders_bench*")
    conn = await asyncpg.connect(database_url("postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def fresh_database(name: str, bin_dir: Path = VENV_BIN) -> str:
    """A new database migrated by `bin_dir`'s orders-api; returns its URL."""
    asyncio.run(recreate_database(name))
    url = database_url(name)
    subprocess.run(
        [str(bin_dir / "orders-api"), "migrate"],
        env={**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING"},
        check=True,
    )
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def worker_pids(self) -> list[int]:
        """The server's worker processes: children of the master, minus multiprocessing helpers."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.process.pid and b"resource_tracker" not in cmdline:
                pids.append(int(stat.parent.name))
        return sorted(pids)


@contextlib.contextmanager
def serve(
    url: str,
    workers: int,
    log_name: str,
    bin_dir: Path = VENV_BIN,
    extra_args: Sequence[str] = (),
) -> Iterator[Server]:
    """`orders-api serve --workers N` on PostgreSQL with production settings (the defaults);
    `bin_dir` picks the installation (another checkout's venv), `extra_args` e.g. --server."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = RESULTS / f"{log_name}.server.log"
    env = {**os.environ, "DATABASE_URL": url}
    for name in ("LOG_LEVEL", "OTEL_EXPORTER", "DB_POOL_SIZE", "WORKERS", "SERVER"):
        env.pop(name, None)
    command = [str(bin_dir / "orders-api"), "serve", "--workers", str(workers), "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, *extra_args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(process, f"http://127.0.0.1:{port}", log_path)
        try:
            wait_ready(server)
            yield server
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited; see {server.log_path}")
        try:
            with urllib.request.urlopen(server.base_url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout}s; see {server.log_path}")


def http(
    method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **headers} if body is not None else headers
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def ensure_wrk() -> str:
    """wrk from PATH, installed with apt-get when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    out("wrk not found: installing it with apt-get")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "install", "-y", "wrk"], check=False)
    if not shutil.which("wrk"):
        subprocess.run([*sudo, "apt-get", "update"], check=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", "wrk"], check=True)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("could not install wrk")
    return found


def find_pgbench() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True):
        return str(candidate)
    raise RuntimeError("pgbench not found (apt-get install postgresql-client)")


@dataclass
class LoadResult:
    """One wrk run. errors = non-2xx (wrk's own count) + socket errors + wrong 2xx status."""

    scenario: str
    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    wrong_2xx: int
    errors: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def run_wrk(
    scenario: str,
    script: str,
    url: str,
    connections: int,
    duration: int,
    env: Mapping[str, str],
) -> LoadResult:
    """wrk -t2 -cN -dS with a Lua scenario; parses wrk's text and the script's JSON line."""
    threads = min(WRK_THREADS, connections)
    command = [
        ensure_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA / script),
        url,
    ]
    run_env = {**os.environ, "BENCH_LUA": str(LUA), "BENCH_THREADS": str(threads), **env}
    done = subprocess.run(command, env=run_env, capture_output=True, text=True, check=True)
    summary: dict[str, Any] | None = None
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            summary = json.loads(line.removeprefix("BENCH_JSON "))
    if summary is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    non_2xx_match = _NON_2XX.search(done.stdout)
    non_2xx = int(non_2xx_match.group(1)) if non_2xx_match else 0
    socket_match = _SOCKET.search(done.stdout)
    socket_errors = sum(map(int, socket_match.groups())) if socket_match else 0
    if non_2xx != summary["status_errors"]:
        raise RuntimeError(f"wrk's Non-2xx line disagrees with its summary:\n{done.stdout}")
    seconds = summary["duration_us"] / 1e6
    return LoadResult(
        scenario=scenario,
        connections=connections,
        requests=summary["requests"],
        seconds=round(seconds, 2),
        rps=round(summary["requests"] / seconds, 1),
        p50_ms=summary["p50_us"] / 1000,
        p90_ms=summary["p90_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        max_ms=summary["max_us"] / 1000,
        non_2xx=non_2xx,
        socket_errors=socket_errors,
        wrong_2xx=summary["wrong_2xx"],
        errors=non_2xx + socket_errors + summary["wrong_2xx"],
    )


_TPS = re.compile(r"tps = ([\d.]+) \(without initial connection time\)")
_LATENCY = re.compile(r"latency average = ([\d.]+) ms")


def run_pgbench(
    script: Path, url: str, clients: int, duration: int, defines: Mapping[str, str]
) -> dict[str, float]:
    """pgbench -n -M prepared -cN -j2 -T S -f script: the database's own rate for that SQL."""
    parsed = make_url(url)
    command = [
        find_pgbench(),
        "-n",
        "-M",
        "prepared",
        f"-c{clients}",
        f"-j{min(2, clients)}",
        f"-T{duration}",
        "-f",
        str(script),
        "-h",
        parsed.host or "127.0.0.1",
        "-p",
        str(parsed.port or 5432),
        "-U",
        parsed.username or "postgres",
    ]
    for name, value in defines.items():
        command += ["-D", f"{name}={value}"]
    command.append(parsed.database or "postgres")
    env = {**os.environ}
    if parsed.password:
        env["PGPASSWORD"] = parsed.password
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    tps = _TPS.search(done.stdout)
    latency = _LATENCY.search(done.stdout)
    if tps is None or latency is None:
        raise RuntimeError(f"pgbench output not understood:\n{done.stdout}\n{done.stderr}")
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    return {
        "tps": float(tps.group(1)),
        "latency_ms": float(latency.group(1)),
        "failed": float(failed.group(1)) if failed else 0.0,
    }


def memory_mb(pid: int) -> dict[str, float]:
    """RSS and the unshared part (USS: private pages) of one process, in MiB."""
    values: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in {"Rss", "Pss", "Private_Clean", "Private_Dirty"}:
                values[name] = int(rest.split()[0]) / 1024
    return {
        "rss_mb": round(values.get("Rss", 0.0), 1),
        "pss_mb": round(values.get("Pss", 0.0), 1),
        "uss_mb": round(values.get("Private_Clean", 0.0) + values.get("Private_Dirty", 0.0), 1),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    text = json.dumps(data, indent=2)
    path.write_text(text)
    (RESULTS / f"{name}-latest.json").write_text(text)
    return path


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "loadavg_at_end": loadavg(),
    }


def loadavg() -> list[float]:
    """1, 5 and 15-minute load averages: how busy the shared machine was."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def as_postgres(command: Sequence[str]) -> list[str]:
    """A command run as the postgres OS user (server binaries refuse root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return list(command)


def wait_port(port: int, within_s: float = 15) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {within_s}s")


@contextlib.contextmanager
def pgbouncer(upstream_url: str, pool_size: int = 20) -> Iterator[int]:
    """PgBouncer in transaction mode in front of the server of `upstream_url`, on a private
    port with its own ini under /tmp, run as the postgres user; yields its port. Debian's
    `pgbouncer` package is installed when missing (1.18 on bookworm)."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "install", "-y", "pgbouncer"], check=True)
    upstream = make_url(upstream_url)
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="orders-bench-pgbouncer-"))
    (folder / "userlist.txt").write_text(f'"{upstream.username or "postgres"}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={upstream.host or "127.0.0.1"} port={upstream.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/userlist.txt
pool_mode = transaction
ignore_startup_parameters = extra_float_digits
max_client_conn = 1000
default_pool_size = {pool_size}
logfile = {folder}/pgbouncer.log
"""
    )
    shutil.chown(folder, "postgres")
    for child in folder.iterdir():
        shutil.chown(child, "postgres")
    process = subprocess.Popen(
        as_postgres([binary, str(folder / "pgbouncer.ini")]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
