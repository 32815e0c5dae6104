#!/usr/bin/env bash
# Static checks: ruff (pyflakes, pycodestyle, import order, bugbear) over the repository and
# mypy over the package. Configuration in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
