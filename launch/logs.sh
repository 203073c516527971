#!/usr/bin/env bash
# Streams the trainer's log from the workers of a slice.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'TXT'
Usage: launch/logs.sh --name NAME --zone ZONE [options]

Shows the trainer's log (~/blip2_jax.log) and follows it (Ctrl-C to stop; the run goes on).

TXT
  help_common
  cat <<'TXT'

Logs:
  --worker W              0 (default), all, or a list such as 0,3; lines from several workers
                          are tagged with the worker's host name
  --lines N               start with the last N lines (default 100)
  --no-follow             print and return instead of following
  --log-file FILE         log under the home directory (default blip2_jax.log)
TXT
}

OPTIONS="--name --zone --project --node-id --worker --lines --no-follow --log-file"
parse_args "$@"
require --name --zone

step_logs
