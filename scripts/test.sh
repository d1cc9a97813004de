#!/usr/bin/env bash
# The tests: set everything up, then lint, type-check and run the three tiers.
#   tests/unit         no server: run with RabbitMQ and S3 pointed at closed ports, to prove it
#   tests/integration  the real RabbitMQ (bootstrap checked it) and a SeaweedFS the suite starts
#   tests/e2e          the daemons as processes over both
# Arguments go to pytest for the server tiers, e.g. `bash scripts/test.sh -k replay`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy --strict"
.venv/bin/mypy
echo "==> pytest tests/unit (no server reachable; on both cores)"
PARJOBS_AMQP_URL=amqp://guest:guest@127.0.0.1:9/ PARJOBS_S3_ENDPOINT_URL=http://127.0.0.1:9 \
    .venv/bin/pytest -n 2 tests/unit
echo "==> pytest tests/integration tests/e2e (real servers)"
exec .venv/bin/pytest tests/integration tests/e2e "$@"
