#!/usr/bin/env bash
# The main job: set everything up, then run it end to end on an embedded SeaweedFS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/parjobs demo
