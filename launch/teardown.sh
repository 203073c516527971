#!/usr/bin/env bash
# Deletes a slice: the queued resource and its TPU VMs.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'TXT'
Usage: launch/teardown.sh --name NAME --zone ZONE [options]

Deletes the queued resource and its TPU VMs (queued-resources delete --force, no prompt).
Checkpoints and logs in the gs:// workdir stay.

TXT
  help_common
  cat <<'TXT'
  --async                 return without waiting for the deletion to finish
TXT
}

OPTIONS="--name --zone --project --async"
parse_args "$@"
require --name --zone

step_delete
