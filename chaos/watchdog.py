"""Kills a topology's processes when the process that started it dies or overstays its time."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from chaos import procs


def watch(parent: int, base_dir: Path, max_seconds: float) -> None:
    """Poll the parent every half second; sweep base_dir's processes when it is gone or late."""
    deadline = time.monotonic() + max_seconds
    while procs.alive(parent) and time.monotonic() < deadline:
        time.sleep(0.5)
    if procs.alive(parent):
        os.kill(parent, 15)  # overstayed: let it clean up itself first
        time.sleep(10)
    for _ in range(3):
        procs.sweep_leftovers(base_dir)
        time.sleep(0.5)


def main() -> None:
    """`python -m chaos.watchdog PARENT_PID BASE_DIR MAX_SECONDS`."""
    parent, base_dir, max_seconds = sys.argv[1:4]
    watch(int(parent), Path(base_dir), float(max_seconds))


if __name__ == "__main__":
    main()
