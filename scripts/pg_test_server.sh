#!/usr/bin/env bash
# Starts a throw-away PostgreSQL server on 127.0.0.1 for the test suite and prints its URL.
# Installs Debian's postgresql when it is missing (needs root, as on CI and the dev machines).
#   url=$(bash scripts/pg_test_server.sh)      # idempotent: re-uses a server it already started
set -euo pipefail
PGROOT="${COUNTERLENS_PG_ROOT:-/tmp/counterlens-pg}"
PORT="${COUNTERLENS_PG_PORT:-55432}"
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [[ -z "$bin" ]]; then
  if [[ $(id -u) -ne 0 ]]; then echo "postgresql is not installed and this is not root" >&2; exit 1; fi
  echo "installing postgresql from Debian..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
fi
# initdb refuses to run as root: run the server as the postgres system user (or the caller if not root).
run=()
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || useradd --system --home /nonexistent postgres
  run=(runuser -u postgres --)
fi
mkdir -p "$PGROOT"
[[ $(id -u) -eq 0 ]] && chown postgres "$PGROOT"
if ! "${run[@]}" "$bin/pg_ctl" -D "$PGROOT/data" status >/dev/null 2>&1; then
  if [[ ! -f "$PGROOT/data/PG_VERSION" ]]; then
    "${run[@]}" "$bin/initdb" -D "$PGROOT/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  "${run[@]}" "$bin/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGROOT -c fsync=off" start >/dev/null
fi
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
