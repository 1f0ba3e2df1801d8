"""schemathesis hooks for our fuzz run: the error-shape check and a small pool of tenants.

Loaded by `st run` through SCHEMATHESIS_HOOKS (see test_schemathesis.py), not by pytest.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

import schemathesis

TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Generated tenants that are valid are folded onto a few fixed ones, so that lists have rows,
# stateful chains meet each other's orders and another tenant's orders are really there.
TENANT_POOL = ("fuzz-a", "fuzz-b", "fuzz-c")

# The contract's codes, by status.
ERROR_CODES = {
    400: "validation_error",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    428: "precondition_required",
    500: "internal_error",
    503: "unavailable",
}


@schemathesis.hook
def map_headers(context: schemathesis.HookContext, headers: dict[str, Any] | None) -> Any:
    if not headers:
        return headers
    for name, value in list(headers.items()):
        if name.lower() == "x-tenant-id" and isinstance(value, str) and TENANT.fullmatch(value):
            headers[name] = TENANT_POOL[zlib.crc32(value.encode()) % len(TENANT_POOL)]
    return headers


@schemathesis.check
def error_body_shape(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    """Every non-2xx answer is JSON {code, message[, details]} with the contract's code."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), f"error content type {content_type!r}"
    body = json.loads(response.content)
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    assert set(body) in ({"code", "message"}, {"code", "message", "details"}), (
        f"error body keys {sorted(body)}"
    )
    assert isinstance(body["message"], str), "message is not a string"
    assert body["message"], "empty message"
    assert "details" not in body or isinstance(body["details"], dict), "details not an object"
    expected = ERROR_CODES.get(response.status_code)
    assert body["code"] == expected, f"status {response.status_code} with code {body['code']!r}"
    return None


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    """JSON Schema counts 97.0 as an integer; the contract rejects it (strict JSON integers)
    and says so in the README. Send the integer itself instead, so the case stays valid."""
    if isinstance(body, dict):
        value = body.get("totalCents")
        if isinstance(value, float) and value.is_integer():
            body["totalCents"] = int(value)
    return body
