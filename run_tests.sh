#!/usr/bin/env bash
# The test command: sets up .venv (Python >= 3.12) on first use, then runs the whole suite.
#   ./run_tests.sh          everything (CI)
#   ./run_tests.sh --fast   the quick tier: goldens, decoding, losses, one trainer run (no `slow` tests)
set -euo pipefail
cd "$(dirname "$0")"
source tools/env.sh
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow" "$@"
  # Tiny models: compiling dominates, so the quick tier asks LLVM for less optimisation.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"  # conftest adds the 8 devices
fi
exec python -m pytest -n 2 --dist loadfile -q -rs tests "$@"
