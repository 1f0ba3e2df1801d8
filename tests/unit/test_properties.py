"""Property tests: the cursor codec, If-Match and the declared parameters, the request
fingerprint."""

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
from pydantic import ValidationError

from orders_api.idempotency import fingerprint
from orders_api.orders import router
from orders_api.orders.router import IF_MATCH, MAX_VERSION, parse_if_match
from orders_api.pagination import InvalidCursor, decode_cursor, encode_cursor
from orders_api.web import Parameter

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


# --- If-Match and the declared parameters --------------------------------------------------

IF_MATCH_PATTERN = IF_MATCH.doc["schema"]["pattern"]  # what /openapi.json documents
versions = st.integers(1, MAX_VERSION)
spaces = st.text(alphabet=" \t", max_size=3)
# Opaque tags as RFC 9110 allows them (etagc: %x21 / %x23-7E / obs-text)
opaque = st.text(alphabet=st.sampled_from([chr(0x21), *map(chr, range(0x23, 0x7F))]), max_size=12)


def names_a_version(text: str) -> bool:
    return re.fullmatch(r"[1-9][0-9]{0,9}", text) is not None and int(text) <= MAX_VERSION


@st.composite
def tag(draw: st.DrawFn, version: int) -> str:
    form = draw(st.sampled_from(['"{}"', "{}", 'W/"{}"']))
    return form.format(version)


@st.composite
def tag_naming_no_version(draw: st.DrawFn) -> str:
    """A well-formed entity-tag that names no version: it never matches."""
    numeric = st.one_of(st.just(0), st.integers(MAX_VERSION + 1, 10**12)).map(str)
    leading_zero = versions.map(lambda v: f"0{v}")
    text = draw(st.one_of(numeric, leading_zero, opaque.filter(lambda t: not names_a_version(t))))
    quoted = draw(st.sampled_from(['"{}"', 'W/"{}"']))
    if text.isdigit() and draw(st.booleans()):
        return text  # bare digits are a tag too
    return quoted.format(text)


def header_of(parts: list[str], data: st.DataObject) -> str:
    return ",".join(data.draw(spaces) + part + data.draw(spaces) for part in parts)


@given(st.lists(versions, min_size=1, max_size=6), st.data())
def test_every_accepted_form_gives_the_versions_named(
    named: list[int], data: st.DataObject
) -> None:
    header = header_of([data.draw(tag(v)) for v in named], data)
    assert re.fullmatch(IF_MATCH_PATTERN, header)
    assert parse_if_match(header) == frozenset(named)


@given(spaces, spaces)
def test_a_star_matches_any_version(before: str, after: str) -> None:
    assert parse_if_match(before + "*" + after) is None


@given(st.lists(tag_naming_no_version(), min_size=1, max_size=4), st.data())
def test_a_tag_naming_no_version_is_well_formed_and_never_matches(
    tags: list[str], data: st.DataObject
) -> None:
    header = header_of(tags, data)
    assert re.fullmatch(IF_MATCH_PATTERN, header), header  # not a 400 ...
    assert parse_if_match(header) == frozenset()  # ... but it matches no version: 409


@given(st.lists(versions, max_size=4), st.lists(tag_naming_no_version(), max_size=4), st.data())
def test_a_list_matches_exactly_the_versions_it_names(
    named: list[int], others: list[str], data: st.DataObject
) -> None:
    parts = [data.draw(tag(v)) for v in named] + others
    assume(parts)
    header = header_of(data.draw(st.permutations(parts)), data)
    assert parse_if_match(header) == frozenset(named)


@given(st.one_of(st.text(), st.from_regex(IF_MATCH_PATTERN, fullmatch=True)))
def test_the_header_check_accepts_exactly_what_the_openapi_schema_documents(
    header: str,
) -> None:
    documented = re.fullmatch(IF_MATCH_PATTERN, header) is not None and len(header) <= 1024
    errors: list[dict[str, Any]] = []
    checked = IF_MATCH.check(header, errors)
    assert (errors == []) is documented, (header, errors)
    if documented:
        assert checked == header
        parsed = parse_if_match(header)
        assert parsed is None or all(1 <= v <= MAX_VERSION for v in parsed)


def test_a_documented_tag_list_longer_than_1024_characters_is_refused() -> None:
    header = ", ".join(['"1"'] * 300)
    assert re.fullmatch(IF_MATCH_PATTERN, header)
    errors: list[dict[str, Any]] = []
    assert IF_MATCH.check(header, errors) is None
    assert [error["type"] for error in errors] == ["string_too_long"]
    assert errors[0]["loc"] == ("header", "If-Match")


PARAMETERS = [value for value in vars(router).values() if isinstance(value, Parameter)]


def values_for(parameter: Parameter) -> st.SearchStrategy[str]:
    """Any text, plus values near what the parameter's schema allows."""
    schema = parameter.doc["schema"]
    near: list[st.SearchStrategy[str]] = [st.text(), st.integers(-5, 200).map(str)]
    if "pattern" in schema:
        near.append(st.from_regex(schema["pattern"], fullmatch=True))
    if "enum" in schema:
        near.append(st.sampled_from(schema["enum"]))
    return st.one_of(near)


def test_the_router_declares_its_parameters() -> None:
    names = {(parameter.where, parameter.name) for parameter in PARAMETERS}
    assert {
        ("header", "Idempotency-Key"),
        ("header", "If-Match"),
        ("query", "limit"),
        ("query", "cursor"),
    } <= names


@pytest.mark.parametrize("parameter", PARAMETERS, ids=lambda p: f"{p.where}-{p.name}")
@given(data=st.data())
def test_the_cheap_check_agrees_with_pydantic(parameter: Parameter, data: st.DataObject) -> None:
    """What `check` accepts (its fast path first) is what the declared field accepts, with the
    same value; what it refuses comes with pydantic's errors."""
    value = data.draw(values_for(parameter))
    errors: list[dict[str, Any]] = []
    checked = parameter.check(value, errors)
    try:
        expected = parameter.adapter.validate_python(value)
    except ValidationError:
        assert checked is None
        assert errors
        assert all(error["loc"][:2] == (parameter.where, parameter.name) for error in errors)
    else:
        assert errors == []
        assert checked == expected
        assert type(checked) is type(expected)


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
