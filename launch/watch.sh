#!/usr/bin/env bash
# Keeps a run going on a (Spot) slice: brings the slice up and starts the run, then polls. When the
# slice is preempted or fails, it deletes it, requests it again, sets it up and starts the same
# run, which resumes from the latest checkpoint in the workdir.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'TXT'
Usage: launch/watch.sh --name NAME --zone ZONE --accelerator-type TYPE --config SPEC
                       --workdir gs://... [options] [-- ARGS]

Brings the slice up (create.sh, setup.sh, run.sh), then polls its state every --interval
seconds. When it is SUSPENDING, SUSPENDED, FAILED or gone (a Spot preemption), it deletes it,
requests it again, sets it up and restarts the run, at most --max-restarts times; a run that
exits with an error on an ACTIVE slice is restarted too. It stops when the run ends with status 0.

TXT
  help_common
  help_create
  help_setup
  help_run
  cat <<'TXT'

Watch:
  --max-restarts N        give up after N restarts (default 10)
  --attach                the run is already going on an ACTIVE slice: only watch it
  --delete-when-done      delete the slice when the run has finished
  --fake-states S1,S2,..  with --dry-run: the states the polls see, in turn (also from
                          $LAUNCH_FAKE_STATES); the dry run stops when they are used up

Example:
  launch/watch.sh --name blip2 --zone us-west4-a --accelerator-type v5litepod-16 --spot \
    --config=configs/stage1_pretrain.py --workdir=gs://my-bucket/blip2/stage1 --interval 300
TXT
}

OPTIONS="--name --zone --project --node-id --accelerator-type --runtime-version --spot --reserved
  --create-flag --interval --src --remote-dir --venv --python --code-only --config --workdir --env
  --tfds-data-dir --libtpu-init-args --log-file --max-restarts --attach --delete-when-done
  --fake-states"
parse_args "$@"
check_create_args
check_run_args

RESTARTS=0
STARTED=0  # whether the run was started on the slice as it is now

count_restart() {
  RESTARTS=$((RESTARTS + 1))
  if ((RESTARTS > MAX_RESTARTS)); then die "giving up: $MAX_RESTARTS restarts used"; fi
  log "restart $RESTARTS of at most $MAX_RESTARTS"
}

start_job() {
  step_setup
  step_run
  STARTED=1
}

# The slice is lost (preempted, failed or gone): request it again and restart the run there.
recreate() {
  count_restart
  STARTED=0
  if [[ $QR_STATE != NOT_FOUND ]]; then step_delete; fi
  step_create
  # If the new request fails too, the next poll sees it and tries again.
  if wait_active; then start_job; fi
}

query_state
case $QR_STATE in
  ACTIVE)
    if ((ATTACH)); then log "watching the run already on $NAME"; STARTED=1; else start_job; fi ;;
  NOT_FOUND | "")
    step_create
    if wait_active; then start_job; fi ;;
  CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING)
    if wait_active; then start_job; fi ;;
  UNKNOWN) die "cannot read the state of $NAME" ;;
  *) recreate ;;
esac

while true; do
  pause
  query_state
  case $QR_STATE in
    "") log "dry run: no more fake states"; break ;;
    ACTIVE)
      if ((!STARTED)); then start_job; continue; fi
      run_status
      case $RUN_EXIT in
        "") ;;
        0)
          log "the run has finished"
          if ((DELETE_WHEN_DONE)); then step_delete; fi
          break ;;
        *)
          warn "the run exited with status $RUN_EXIT; starting it again"
          count_restart
          step_run ;;
      esac ;;
    CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING)
      if wait_active; then start_job; fi ;;
    DELETING | UNKNOWN) ;;
    *) recreate ;;
  esac
done
