#!/usr/bin/env bash
# The main job: the miniature two-stage BLIP-2 pipeline on the built-in synthetic data (CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")"
source tools/env.sh
exec python -m blip2_jax.miniature "$@"
