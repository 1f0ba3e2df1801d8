"""PATCH /orders/{id}/confirm: optimistic locking with If-Match, strict body, order of checks."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.api.support import (
    assert_error,
    close_order,
    confirmed_order,
    create_order,
    get_order,
)
from tests.helpers import auth


async def confirm(
    client: httpx.AsyncClient,
    tenant: str,
    order_id: str,
    if_match: str | None = '"1"',
    **kwargs: Any,
) -> httpx.Response:
    headers = auth(tenant) if if_match is None else auth(tenant, If_Match=if_match)
    headers.update(kwargs.pop("headers", {}))
    if "json" not in kwargs and "content" not in kwargs:
        kwargs["json"] = {"totalCents": 1250}
    return await client.patch(f"/orders/{order_id}/confirm", headers=headers, **kwargs)


async def test_success_bumps_the_version_and_the_etag(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order = await create_order(client, tenant)
    response = await confirm(client, tenant, order["id"], json={"totalCents": 4200})
    assert response.status_code == 200
    assert response.json() == {
        "id": order["id"],
        "status": "confirmed",
        "version": 2,
        "totalCents": 4200,
    }
    assert response.headers["ETag"] == '"2"'
    stored = await get_order(client, tenant, order["id"])
    assert stored["status"] == "confirmed"
    assert stored["version"] == 2
    assert stored["totalCents"] == 4200
    assert stored["createdAt"] == order["createdAt"]
    assert stored["updatedAt"] > stored["createdAt"]


@pytest.mark.parametrize("total", [0, 2_147_483_647])
async def test_total_cents_bounds_are_accepted(
    client: httpx.AsyncClient, tenant: str, total: int
) -> None:
    order = await create_order(client, tenant)
    response = await confirm(client, tenant, order["id"], json={"totalCents": total})
    assert response.status_code == 200
    assert response.json()["totalCents"] == total
    assert (await get_order(client, tenant, order["id"]))["totalCents"] == total


@pytest.mark.parametrize(
    ("content", "total"),
    [(b'{"totalCents": 12.0}', 12), (b'{"totalCents": 1e2}', 100), (b'{"totalCents": 0.0}', 0)],
)
async def test_an_integral_number_counts_as_an_integer(
    client: httpx.AsyncClient, tenant: str, content: bytes, total: int
) -> None:
    """As in JSON Schema: a number with no fraction is an integer, and is sent back as one."""
    order = await create_order(client, tenant)
    response = await confirm(
        client, tenant, order["id"], content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert f'"totalCents":{total}}}' in response.text
    assert (await get_order(client, tenant, order["id"]))["totalCents"] == total


@pytest.mark.parametrize(
    "if_match",
    [
        '"1"',
        "1",
        'W/"1"',
        '"2", "1"',
        '"1","7"',
        'W/"5", W/"1"',
        "*",
        '  "1"  ',
        # A tag that names no version never matches, but another tag of the list can.
        '"0", "1"',
        '"abc", W/"1"',
        '"99999999999", 1',
    ],
)
async def test_each_if_match_form_is_accepted(
    client: httpx.AsyncClient, tenant: str, if_match: str
) -> None:
    order = await create_order(client, tenant)
    response = await confirm(client, tenant, order["id"], if_match)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2
    assert response.headers["ETag"] == '"2"'


@pytest.mark.parametrize(
    "if_match",
    [
        '"2"',
        "2",
        'W/"2"',
        '"2", "3"',
        # Well-formed entity-tags that name no version (RFC 9110): they never match.
        '"0"',
        "0",
        '"abc"',
        'W/"x"',
        '""',
        '"a"',
        '"1.0"',
        '"-1"',
        '"2147483648"',
        '"99999999999"',
        "99999999999",
        '"0", "abc", W/"x"',
    ],
)
async def test_stale_version_is_a_conflict_and_changes_nothing(
    client: httpx.AsyncClient, tenant: str, if_match: str
) -> None:
    order = await create_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await confirm(client, tenant, order["id"], if_match)
    body = assert_error(response, 409, "conflict")
    assert body == {
        "code": "conflict",
        "message": "stale version",
        "details": {"reason": "stale_version", "currentVersion": 1},
    }
    assert response.headers["ETag"] == '"1"'
    assert await get_order(client, tenant, order["id"]) == before


async def test_missing_if_match_is_precondition_required(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order = await create_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await confirm(client, tenant, order["id"], None)
    assert_error(response, 428, "precondition_required")
    assert await get_order(client, tenant, order["id"]) == before


@pytest.mark.parametrize(
    "if_match",
    [
        "",
        "abc",
        '"1',
        '1"',
        "W/1",
        'w/"1"',
        "-1",
        "1.0",
        '"1" "2"',
        '"1",',
        ",",
        "**",
        '*, "1"',
        '"a"b"',
        '"1"' + ", " * 600,
        ", ".join(['"1"'] * 300),  # well-formed, but longer than 1024 characters
    ],
)
async def test_malformed_if_match_is_rejected(
    client: httpx.AsyncClient, tenant: str, if_match: str
) -> None:
    order = await create_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await confirm(client, tenant, order["id"], if_match)
    assert_error(response, 400, "validation_error")
    assert await get_order(client, tenant, order["id"]) == before


@pytest.mark.parametrize(
    "body",
    [
        {"totalCents": "100"},
        {"totalCents": 1.5},
        {"totalCents": 0.1},
        {"totalCents": -1.0},
        {"totalCents": 2_147_483_648.0},
        {"totalCents": True},
        {"totalCents": False},
        {"totalCents": None},
        {"totalCents": -1},
        {"totalCents": 2_147_483_648},
        {"totalCents": 10**20},
        {"totalCents": [1]},
        {"totalCents": {"value": 1}},
        {},
        {"totalcents": 1},
        {"totalCents": 1, "note": "extra"},
        {"totalCents": 1, "status": "closed"},
        [],
        [{"totalCents": 1}],
        "totalCents",
        1,
        None,
    ],
)
async def test_invalid_body_is_rejected_and_changes_nothing(
    client: httpx.AsyncClient, tenant: str, body: Any
) -> None:
    order = await create_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await confirm(client, tenant, order["id"], json=body)
    error = assert_error(response, 400, "validation_error")
    for item in error["details"]["errors"]:
        assert set(item) == {"loc", "msg", "type"}  # the rejected input is not echoed
    assert await get_order(client, tenant, order["id"]) == before


@pytest.mark.parametrize(
    "content",
    [b"", b"   ", b"{", b'{"totalCents": 1', b"{'totalCents': 1}", b'{"totalCents": 01}', b"NaN"],
)
async def test_malformed_or_empty_json_is_rejected(
    client: httpx.AsyncClient, tenant: str, content: bytes
) -> None:
    order = await create_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await confirm(
        client, tenant, order["id"], content=content, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "validation_error")
    assert await get_order(client, tenant, order["id"]) == before


async def test_non_json_body_is_unsupported_media_type(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order = await create_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await client.patch(
        f"/orders/{order['id']}/confirm",
        headers=auth(tenant, If_Match='"1"', Content_Type="text/plain"),
        content=b'{"totalCents": 1}',
    )
    assert_error(response, 415, "unsupported_media_type")
    assert await get_order(client, tenant, order["id"]) == before


async def test_json_with_charset_is_accepted(client: httpx.AsyncClient, tenant: str) -> None:
    order = await create_order(client, tenant)
    response = await client.patch(
        f"/orders/{order['id']}/confirm",
        headers=auth(tenant, If_Match='"1"', Content_Type="application/json; charset=utf-8"),
        content=b'{"totalCents": 7}',
    )
    assert response.status_code == 200
    assert response.json()["totalCents"] == 7


async def test_unknown_order_is_not_found(client: httpx.AsyncClient, tenant: str) -> None:
    response = await confirm(client, tenant, str(uuid.uuid4()))
    assert_error(response, 404, "not_found")


async def test_another_tenants_order_is_not_found_and_unchanged(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order = await create_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    for if_match in ('"1"', "*", '"9"'):
        response = await confirm(client, tenant + "-other", order["id"], if_match)
        assert_error(response, 404, "not_found")
    assert await get_order(client, tenant, order["id"]) == before


@pytest.mark.parametrize("order_id", ["not-a-uuid", "123", "0" * 33, "%20", "1e9"])
async def test_malformed_id_is_not_found(
    client: httpx.AsyncClient, tenant: str, order_id: str
) -> None:
    response = await confirm(client, tenant, order_id)
    assert_error(response, 404, "not_found")


async def test_confirming_a_confirmed_order_is_an_invalid_transition(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order = await confirmed_order(client, tenant, total_cents=500)
    before = await get_order(client, tenant, order["id"])
    for if_match in ('"2"', "*"):
        response = await confirm(client, tenant, order["id"], if_match)
        body = assert_error(response, 409, "conflict")
        assert body["details"] == {"reason": "invalid_transition", "currentStatus": "confirmed"}
    assert await get_order(client, tenant, order["id"]) == before


async def test_confirming_a_closed_order_is_an_invalid_transition(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order = await confirmed_order(client, tenant)
    await close_order(client, tenant, order["id"])
    response = await confirm(client, tenant, order["id"], '"3"')
    body = assert_error(response, 409, "conflict")
    assert body["details"] == {"reason": "invalid_transition", "currentStatus": "closed"}


async def test_stale_version_on_an_order_in_the_wrong_state_reports_stale_version(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order = await confirmed_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await confirm(client, tenant, order["id"], '"1"')
    body = assert_error(response, 409, "conflict")
    assert body["details"] == {"reason": "stale_version", "currentVersion": 2}
    assert await get_order(client, tenant, order["id"]) == before


async def test_second_confirm_with_the_same_etag_is_stale(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order = await create_order(client, tenant)
    assert (await confirm(client, tenant, order["id"], '"1"')).status_code == 200
    again = await confirm(client, tenant, order["id"], '"1"', json={"totalCents": 1})
    assert assert_error(again, 409, "conflict")["details"]["reason"] == "stale_version"
    assert (await get_order(client, tenant, order["id"]))["totalCents"] == 1250


# Order of checks: 401 -> 400 (headers, JSON, body) -> 428 -> 404 -> 409 stale -> 409 state.


async def test_tenant_is_checked_first(client: httpx.AsyncClient, tenant: str) -> None:
    response = await client.patch(
        "/orders/not-a-uuid/confirm",
        headers={"If-Match": "garbage", "Content-Type": "application/json"},
        content=b"{",
    )
    assert_error(response, 401, "unauthorized")


async def test_malformed_if_match_answers_before_unknown_id(
    client: httpx.AsyncClient, tenant: str
) -> None:
    response = await confirm(client, tenant, str(uuid.uuid4()), "garbage")
    assert_error(response, 400, "validation_error")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {"totalCents": -5}},
        {"json": {}},
        {"content": b"{", "headers": {"Content-Type": "application/json"}},
    ],
)
async def test_bad_body_answers_before_missing_if_match(
    client: httpx.AsyncClient, tenant: str, kwargs: dict[str, Any]
) -> None:
    order = await create_order(client, tenant)
    response = await confirm(client, tenant, order["id"], None, **kwargs)
    assert_error(response, 400, "validation_error")


async def test_bad_body_answers_before_unknown_id(client: httpx.AsyncClient, tenant: str) -> None:
    response = await confirm(client, tenant, str(uuid.uuid4()), json={"totalCents": "1"})
    assert_error(response, 400, "validation_error")


@pytest.mark.parametrize("order_id", ["unknown", "malformed", "foreign"])
async def test_missing_if_match_answers_before_not_found(
    client: httpx.AsyncClient, tenant: str, order_id: str
) -> None:
    ids = {
        "unknown": str(uuid.uuid4()),
        "malformed": "not-a-uuid",
        "foreign": (await create_order(client, tenant + "-other"))["id"],
    }
    response = await confirm(client, tenant, ids[order_id], None)
    assert_error(response, 428, "precondition_required")


async def test_not_found_answers_before_stale_version(
    client: httpx.AsyncClient, tenant: str
) -> None:
    foreign = await create_order(client, tenant + "-other")
    for order_id in (str(uuid.uuid4()), foreign["id"]):
        for if_match in ('"42"', '"0"', '"abc"'):
            response = await confirm(client, tenant, order_id, if_match)
            assert_error(response, 404, "not_found")
