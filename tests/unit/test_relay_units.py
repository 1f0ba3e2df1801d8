"""Relay pieces with no I/O: backoff, subjects, which failures are charged to a row."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest

from orders_api.outbox.models import subject_for
from orders_api.outbox.publishers import BrokerUnavailable, is_transient
from orders_api.outbox.relay import backoff_delay


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 0.25, 0.5), (2, 0.5, 1.0), (3, 1.0, 2.0), (8, 30.0, 60.0), (30, 30.0, 60.0)],
)
def test_backoff_doubles_per_attempt_is_capped_and_jittered(
    attempt: int, low: float, high: float
) -> None:
    assert backoff_delay(attempt, 0.5, 60.0, lambda: 0.0) == low
    assert backoff_delay(attempt, 0.5, 60.0, lambda: 1.0) == high
    assert low < backoff_delay(attempt, 0.5, 60.0, lambda: 0.5) < high


def test_subject_takes_the_configured_prefix() -> None:
    assert subject_for("orders.closed", "orders") == "orders.closed"
    assert subject_for("orders.closed", "acme.orders") == "acme.orders.closed"


@pytest.mark.parametrize(
    "error",
    [
        BrokerUnavailable("down"),
        nats.errors.TimeoutError(),
        TimeoutError(),
        ConnectionRefusedError(),
        nats.errors.ConnectionClosedError(),
        nats.errors.OutboundBufferLimitError(),
        nats.errors.NoRespondersError(),
        nats.js.errors.NoStreamResponseError(),
        nats.js.errors.ServiceUnavailableError(),
    ],
)
def test_broker_side_failures_are_not_charged_to_the_row(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        nats.errors.MaxPayloadError(),
        nats.js.errors.BadRequestError(code=400, err_code=10054, description="too big"),
        nats.js.errors.APIError(code=409, description="conflict"),
        ValueError("cannot encode"),
    ],
)
def test_row_specific_failures_count_as_attempts(error: BaseException) -> None:
    assert not is_transient(error)
