"""Process groups, ports, bounded waits and leftover clean-up shared by the topology parts."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TAG = "CHAOS_TOPOLOGY"  # env var set on every process we start: finds leftovers of a crashed run
PORT_RANGE = (20000, 30000)  # below the kernel's ephemeral range, away from 4222/5432/…
_PR_SET_CHILD_SUBREAPER = 36
_OWNED: set[int] = set()  # pids of the Procs we spawned: their Popen reaps them


class WaitTimeout(TimeoutError):
    """A bounded wait ran out of time."""


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 0.2,
) -> tuple[T, float]:
    """Call `probe` until it returns something not None/False; (value, seconds) or WaitTimeout."""
    start = time.monotonic()
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
        except Exception as exc:  # a probe may fail while the thing comes up
            value, last_error = None, exc
        if value is not None and value is not False:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise WaitTimeout(f"{what}: not within {timeout:.0f}s (last error: {last_error!r})")
        time.sleep(interval)


def free_ports(count: int, taken: set[int] | None = None) -> list[int]:
    """`count` distinct loopback TCP ports that bind now, picked at random from PORT_RANGE."""
    taken = set(taken or ())
    ports: list[int] = []
    rng = random.Random()
    for _ in range(count * 200):
        if len(ports) == count:
            return ports
        port = rng.randrange(*PORT_RANGE)
        if port in taken or not port_bindable(port):
            continue
        taken.add(port)
        ports.append(port)
    raise RuntimeError(f"could not find {count} free ports in {PORT_RANGE}")


def port_bindable(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port (so we may)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def become_subreaper() -> None:
    """Adopt orphaned descendants (pg_autoctl's children after a SIGKILL) so we can reap them."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphans() -> None:
    """waitpid() our zombie children that no Proc owns: orphans adopted as subreaper.

    A zombie postmaster still "exists" for kill(pid, 0), so a restarted postgres would refuse
    to start over its lock files until the old one is reaped.
    """
    me = os.getpid()
    for pid, ppid, state in _all_stats():
        if ppid == me and state == "Z" and pid not in _OWNED:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def wait_gone(pid: int, timeout: float) -> None:
    """Until pid has left the process table (reaping it if it is our orphan)."""

    def gone() -> bool:
        reap_orphans()
        return not Path(f"/proc/{pid}").exists()

    wait_until(f"pid {pid} gone", gone, timeout, 0.05)


def _all_stats() -> list[tuple[int, int, str]]:
    """(pid, ppid, state) of every process."""
    stats: list[tuple[int, int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        stats.append((int(entry), int(rest[1]), rest[0]))
    return stats


def alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw[raw.rfind(")") + 2] != "Z"


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal one process, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def sweep_leftovers(base_dir: Path) -> list[int]:
    """SIGKILL processes of an earlier run in base_dir: tagged env, or base_dir on the command line.

    PostgreSQL overwrites its environment with the process title, so its postmaster is found by
    `-D <base_dir>/…` on its command line; its backends exit when the postmaster dies.
    """
    marker = f"{TAG}={base_dir}".encode()
    needle = f"{base_dir}/".encode()
    me = os.getpid()
    killed: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        if _is_ours(pid, marker, needle):
            kill_pid(pid)
            killed.append(pid)
    return killed


_OUR_PROGRAMS = (b"postgres", b"pg_autoctl", b"pgbouncer", b"nats-server", b"haproxy")


def _is_ours(pid: int, marker: bytes, needle: bytes) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if marker in environ.split(b"\0"):
        return True
    program = os.path.basename(cmdline.split(b"\0", 1)[0])
    return needle in cmdline and program in _OUR_PROGRAMS


@dataclass
class Proc:
    """One started process, leader of its own process group, logging to a file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the process and what it forked without setsid)."""
        kill_group(self.popen.pid, sig)

    def wait(self, timeout: float) -> bool:
        """Whether the process exited within timeout (it is reaped either way if it did)."""
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of its log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: Mapping[str, str],
    cwd: Path,
    user: str | None = None,
) -> Proc:
    """Start argv in a new session (own process group), output appended to log_dir/<name>.log."""
    log_path = log_dir / f"{name}.log"
    uid, gid, groups = _ids(user)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%H:%M:%S')} start {' '.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
    _OWNED.add(popen.pid)
    return Proc(name, list(argv), log_path, popen)


def _ids(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """(uid, gid, extra groups) to run as user; all None when not root or no user asked."""
    if user is None or os.geteuid() != 0:
        return None, None, None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, []


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    timeout: float = 30,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion, bounded by timeout; raise with its output on failure."""
    uid, gid, groups = _ids(user)
    result = subprocess.run(
        list(argv),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        user=uid,
        group=gid,
        extra_groups=groups,
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def chown_tree(path: Path, user: str) -> None:
    """Give path (and everything below) to user, when we are root."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    os.lchown(path, entry.pw_uid, entry.pw_gid)
