#!/usr/bin/env bash
# Sets everything up (idempotent) and starts counterlens on the embedded defaults: SQLite and index files
# in the data dir (COUNTERLENS_DATA_DIR, default a per-user data dir), the demo catalog loaded, listening
# on 127.0.0.1:8000.  Extra arguments go to `counterlens serve` (e.g. --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/counterlens demo
exec .venv/bin/counterlens serve "$@"
