#!/usr/bin/env bash
# Runs the whole test suite, installing what it needs first (idempotent): the virtual environment with
# every extra, and a throw-away PostgreSQL on loopback for the storage tests.  Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=export,dev,postgres,ray,demo bash scripts/bootstrap.sh
COUNTERLENS_TEST_POSTGRES_URL="$(bash scripts/pg_test_server.sh)"
export COUNTERLENS_TEST_POSTGRES_URL
.venv/bin/ruff check service embeddings index scripts tests
.venv/bin/mypy service embeddings index
.venv/bin/mypy --explicit-package-bases scripts
.venv/bin/mypy tests  # (untyped test functions allowed: pyproject overrides)
exec .venv/bin/python -m pytest "$@"
