"""schemathesis against /openapi.json of a real `orders-api serve --workers 2`.

Every built-in check (no 5xx, status codes, content types, headers and bodies as documented,
positive data accepted, negative data rejected, 405 with Allow, stateful links followed)
plus our own: every error body is {code, message[, details]} with the contract's code.
The run is bounded by --max-examples and a fixed seed, so CI is repeatable; set FUZZ_SEED
to explore other inputs locally.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis

from tests.fuzz import st_hooks
from tests.live import BIN, running_server

HERE = Path(__file__).resolve().parent
MAX_EXAMPLES = 20
MIN_CASES = 300  # what one run generates with MAX_EXAMPLES; fewer means a phase did not run


def test_fuzzing_the_running_server_finds_nothing(
    fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    report_path = tmp_path / "schemathesis.json"
    with running_server(fresh_database(), tmp_path) as server:
        run = subprocess.run(
            [
                str(BIN / "st"),
                "--config-file",
                str(HERE / "schemathesis.toml"),
                "run",
                f"{server.base_url}/openapi.json",
                "--checks",
                "all",
                # X-Tenant-Id is declared as an apiKey scheme (every orders operation needs it),
                # but it is the tenant a trusted gateway asserts, not a secret: every well-formed
                # value names a tenant and is accepted, which this check would count as invalid
                # authentication accepted. Missing and malformed tenants (401 on every endpoint)
                # are tests/api/test_tenancy.py's; AUTH_MODE=jwt refusals test_jwt_auth.py's.
                "--exclude-checks",
                "ignored_auth",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                os.environ.get("FUZZ_SEED", "20261127"),
                "--generation-database",
                "none",
                "--request-timeout",
                "10",
                "--no-color",
                "--report",
                "json",
                "--report-json-path",
                str(report_path),
            ],
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HERE / "st_hooks.py")},
            capture_output=True,
            text=True,
            timeout=170,
        )
        server_log = server.log_tail(60)
    output = run.stdout[-6000:] + run.stderr[-2000:] + "\n--- server ---\n" + server_log
    assert run.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["failures"] == [], output
    assert report["errors"] == [], output
    assert report["operations"]["tested"] == report["operations"]["total"] == 8, output
    phases = {name: phase["status"] for name, phase in report["phases"].items()}
    assert phases["coverage"] == phases["fuzzing"] == phases["stateful"] == "success", phases
    assert report["test_cases"]["generated"] >= MIN_CASES, report["test_cases"]


def _response(status: int, body: bytes, content_type: str = "application/json") -> Any:
    return schemathesis.Response(
        status_code=status,
        headers={"content-type": [content_type]},
        content=body,
        request=requests.Request("GET", "http://test/orders").prepare(),
        elapsed=0.0,
        verify=True,
    )


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (404, b'{"detail":"Not Found"}', "application/json"),
        (400, b'{"code":"validation_error","message":"x","extra":1}', "application/json"),
        (400, b'{"code":"validation_error"}', "application/json"),
        (400, b'{"code":"validation_error","message":"x","details":[1]}', "application/json"),
        (409, b'{"code":"validation_error","message":"x"}', "application/json"),
        (500, b"Internal Server Error", "text/plain"),
    ],
)
def test_the_error_shape_check_rejects_other_bodies(
    status: int, body: bytes, content_type: str
) -> None:
    with pytest.raises(AssertionError):
        st_hooks.error_body_shape(None, _response(status, body, content_type), None)  # type: ignore[arg-type]


def test_the_error_shape_check_accepts_the_contract_shape() -> None:
    body = b'{"code":"conflict","message":"stale version","details":{"reason":"stale_version"}}'
    assert st_hooks.error_body_shape(None, _response(409, body), None) is None  # type: ignore[arg-type]
    assert st_hooks.error_body_shape(None, _response(201, b"{}"), None) is None  # type: ignore[arg-type]
