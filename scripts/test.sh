#!/usr/bin/env bash
# The tests: set everything up, then lint, type-check and run the whole suite against the real
# servers (the suite starts its own SeaweedFS; RabbitMQ is the one bootstrap checked).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy --strict"
.venv/bin/mypy
echo "==> pytest"
exec .venv/bin/pytest "$@"
