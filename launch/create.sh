#!/usr/bin/env bash
# Requests a TPU slice as a queued resource and waits until it is ACTIVE.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'TXT'
Usage: launch/create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]

Requests a TPU slice (gcloud compute tpus queued-resources create) and waits until it is ACTIVE.

TXT
  help_common
  help_create
  cat <<'TXT'
  --no-wait               return once the request is queued

Example:
  launch/create.sh --name blip2 --zone us-west4-a --accelerator-type v5litepod-16 --spot
TXT
}

OPTIONS="--name --zone --project --node-id --accelerator-type --runtime-version --spot --reserved
  --create-flag --interval --no-wait --fake-states"
parse_args "$@"
check_create_args

step_create
if ((!NO_WAIT)); then
  wait_active || die "$NAME did not become ACTIVE (state $QR_STATE)"
  log "$NAME is ACTIVE"
fi
