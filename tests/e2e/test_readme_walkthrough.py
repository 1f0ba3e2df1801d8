"""The README's cURL walkthrough, run verbatim (bash) against a live server: what each step
says it answers is what it answers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.helpers import PROJECT_ROOT, free_port

MARKER = "<!-- walkthrough -->"


def walkthrough() -> str:
    """The sh block that follows the marker in README.md."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    after = readme.split(MARKER, 1)[1]
    match = re.search(r"```sh\n(.*?)```", after, re.S)
    assert match is not None, "no sh block after the walkthrough marker"
    return match.group(1)


def test_the_walkthrough_answers_what_it_says(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
    server = subprocess.Popen(
        [str(PROJECT_ROOT / ".venv/bin/orders-api"), "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server not ready"
                time.sleep(0.2)
        run = subprocess.run(
            ["bash", "-c", walkthrough()],
            env={**env, "B": base},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert run.returncode == 0, run.stderr
    output = run.stdout
    statuses = re.findall(r"^HTTP/1\.1 (\d{3})", output, re.M)
    # create, replay, reuse, confirm, stale confirm, close, retried close, conditional read
    assert statuses == ["201", "200", "409", "200", "409", "200", "200", "304"], output
    assert output.lower().count("idempotent-replayed: true") == 2, output
    assert '"reason":"idempotency_key_reused"' in output
    assert '"reason":"stale_version","currentVersion":2' in output
    pages = [json.loads(line) for line in output.splitlines() if line.startswith('{"items"')]
    first, second, closed = pages
    assert len(first["items"]) == 1
    assert first["items"][0]["status"] == "draft"
    assert first["nextCursor"] is not None
    assert len(second["items"]) == 1
    assert second["items"][0]["status"] == "closed"
    assert second["nextCursor"] is None
    assert [item["id"] for item in closed["items"]] == [second["items"][0]["id"]]
    assert closed["nextCursor"] is None
