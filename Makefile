# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install run test lint migrate bench bench-scale clean

$(BIN)/orders-api: pyproject.toml uv.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/pip install --quiet uv
	$(UV) sync --locked --python $(BIN)/python
	touch $@

install: $(BIN)/orders-api

run: install
	$(BIN)/orders-api serve

migrate: install
	$(BIN)/orders-api migrate

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# Load benchmark against PostgreSQL (BENCH_PG_URL, default postgres@127.0.0.1:5432): wrk per
# scenario at 10 and 64 connections plus the pgbench ceiling; about 6 minutes. Not run in CI.
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Scale run: 1,000,000 orders over 100 tenants bulk-loaded by SQL; first vs 50,000-deep page,
# create vs the empty database, EXPLAIN of the list statement; about 3 minutes.
bench-scale: install
	$(BIN)/python -m bench.scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
