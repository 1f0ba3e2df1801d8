"""Property tests: the cursor codec, the If-Match parser and the request fingerprint."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from orders_api.errors import ValidationFailed
from orders_api.idempotency import fingerprint
from orders_api.orders.router import IF_MATCH_PATTERN, MAX_VERSION, parse_if_match
from orders_api.pagination import InvalidCursor, decode_cursor, encode_cursor

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

tenants = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
secrets = st.binary(min_size=1, max_size=64)
timestamps = st.datetimes(
    # hypothesis takes naive bounds and attaches the timezone itself
    min_value=datetime(1, 1, 2),  # noqa: DTZ001
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.just(UTC),
)
uuids = st.uuids()


# --- cursor -------------------------------------------------------------------------------


@given(secrets, tenants, timestamps, uuids)
def test_a_cursor_round_trips_exactly(
    secret: bytes, tenant: str, created_at: datetime, order_id: uuid.UUID
) -> None:
    cursor = encode_cursor(secret, tenant, created_at, order_id)
    assert re.fullmatch(r"[A-Za-z0-9_-]{54}", cursor)
    assert decode_cursor(secret, tenant, cursor) == (created_at, order_id)


@given(secrets, tenants, timestamps, uuids, st.data())
def test_any_changed_character_is_rejected(
    secret: bytes, tenant: str, created_at: datetime, order_id: uuid.UUID, data: st.DataObject
) -> None:
    cursor = encode_cursor(secret, tenant, created_at, order_id)
    position = data.draw(st.integers(0, len(cursor) - 1))
    replacement = data.draw(st.characters(codec="latin-1").filter(lambda c: c != cursor[position]))
    tampered = cursor[:position] + replacement + cursor[position + 1 :]
    with pytest.raises(InvalidCursor):
        decode_cursor(secret, tenant, tampered)


@given(secrets, tenants, timestamps, uuids, st.data())
def test_a_cut_or_extended_cursor_is_rejected(
    secret: bytes, tenant: str, created_at: datetime, order_id: uuid.UUID, data: st.DataObject
) -> None:
    cursor = encode_cursor(secret, tenant, created_at, order_id)
    cut = data.draw(st.integers(0, len(cursor) - 1))
    suffix = data.draw(st.text(alphabet=B64URL + "=", min_size=1, max_size=8))
    for tampered in (cursor[:cut], cursor + suffix, cursor[:cut] + suffix):
        if tampered != cursor:
            with pytest.raises(InvalidCursor):
                decode_cursor(secret, tenant, tampered)


@given(secrets, tenants, tenants, timestamps, uuids)
def test_a_cursor_is_rejected_for_another_tenant(
    secret: bytes, tenant: str, other: str, created_at: datetime, order_id: uuid.UUID
) -> None:
    assume(tenant != other)
    cursor = encode_cursor(secret, tenant, created_at, order_id)
    with pytest.raises(InvalidCursor):
        decode_cursor(secret, other, cursor)


@given(secrets, secrets, tenants, timestamps, uuids)
def test_a_cursor_is_rejected_under_another_secret(
    secret: bytes, other: bytes, tenant: str, created_at: datetime, order_id: uuid.UUID
) -> None:
    assume(secret != other)
    cursor = encode_cursor(secret, tenant, created_at, order_id)
    with pytest.raises(InvalidCursor):
        decode_cursor(other, tenant, cursor)


@given(secrets, tenants, st.one_of(st.text(), st.text(alphabet=B64URL, min_size=54, max_size=54)))
def test_arbitrary_text_is_never_a_cursor(secret: bytes, tenant: str, text: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(secret, tenant, text)


# --- If-Match -----------------------------------------------------------------------------

versions = st.integers(1, MAX_VERSION)
spaces = st.text(alphabet=" \t", max_size=3)


@st.composite
def tag(draw: st.DrawFn, version: int) -> str:
    form = draw(st.sampled_from(['"{}"', "{}", 'W/"{}"']))
    return form.format(version)


@given(st.lists(versions, min_size=1, max_size=6), st.data())
def test_every_accepted_form_gives_the_versions_named(
    named: list[int], data: st.DataObject
) -> None:
    parts = [data.draw(spaces) + data.draw(tag(v)) + data.draw(spaces) for v in named]
    header = ",".join(parts)
    assert parse_if_match(header) == frozenset(named)
    assert re.fullmatch(IF_MATCH_PATTERN, header)


@given(spaces, spaces)
def test_a_star_matches_any_version(before: str, after: str) -> None:
    assert parse_if_match(before + "*" + after) is None


@given(st.one_of(st.just(0), st.integers(MAX_VERSION + 1, 10**10 - 1)), st.data())
def test_a_version_out_of_range_is_a_400(version: int, data: st.DataObject) -> None:
    with pytest.raises(ValidationFailed):
        parse_if_match(data.draw(tag(version)))


@given(st.one_of(st.text(), st.from_regex(IF_MATCH_PATTERN, fullmatch=True)))
def test_the_parser_accepts_exactly_what_the_openapi_pattern_documents(header: str) -> None:
    documented = re.fullmatch(IF_MATCH_PATTERN, header) is not None
    try:
        parsed = parse_if_match(header)
    except ValidationFailed:
        assert not documented, header
    else:
        assert documented, header
        assert parsed is None or all(1 <= v <= MAX_VERSION for v in parsed)


# --- request fingerprint ------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),  # what orjson.loads gives for a JSON integer
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=6)


def _reordered(value: Any) -> Any:
    """The same value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: _reordered(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


@given(
    json_objects,
    st.sampled_from([None, 0, 2, "\t"]),
    st.sampled_from([(",", ":"), (" , ", " :  ")]),
)
def test_key_order_and_whitespace_do_not_count(
    body: dict[str, Any], indent: int | str | None, separators: tuple[str, str]
) -> None:
    respelled = json.dumps(_reordered(body), indent=indent, separators=separators)
    assert fingerprint(orjson.loads(respelled)) == fingerprint(body)
    assert fingerprint(_reordered(body)) == fingerprint(body)


@given(json_values, json_values)
def test_different_values_have_different_fingerprints(first: Any, second: Any) -> None:
    assume(
        orjson.dumps(first, option=orjson.OPT_SORT_KEYS)
        != orjson.dumps(second, option=orjson.OPT_SORT_KEYS)
    )
    assert fingerprint(first) != fingerprint(second)


@given(json_objects, st.text(max_size=8), json_values)
def test_changing_one_field_changes_the_fingerprint(
    body: dict[str, Any], key: str, value: Any
) -> None:
    changed = {**body, key: value}
    assume(key not in body or orjson.dumps(body[key]) != orjson.dumps(value))
    assert fingerprint(changed) != fingerprint(body)
