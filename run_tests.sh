#!/usr/bin/env bash
# The test command: sets up .venv (Python >= 3.12) on first use, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")"
source tools/env.sh
exec python -m pytest -n 2 --dist loadfile -q -rs tests "$@"
