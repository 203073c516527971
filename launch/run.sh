#!/usr/bin/env bash
# Starts the trainer on every worker of a slice, in the background.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'TXT'
Usage: launch/run.sh --name NAME --zone ZONE --config SPEC --workdir gs://... [options] [-- ARGS]

On every worker: stops whatever still holds the TPU (an earlier run) and removes
/tmp/libtpu_lockfile, then starts
  python -m blip2_jax.main --config=SPEC --workdir=DIR ARGS
with nohup in the background, appending to ~/blip2_jax.log. The trainer resumes from the latest
checkpoint in the workdir. Follow it with launch/logs.sh.

TXT
  help_common
  help_run
  cat <<'TXT'
  --remote-dir DIR        where setup.sh put the code (default blip2_jax)
  --venv DIR              where setup.sh made the environment (default venv)

Example:
  launch/run.sh --name blip2 --zone us-west4-a --config=configs/stage1_pretrain.py \
    --workdir=gs://my-bucket/blip2/stage1 --tfds-data-dir=gs://my-bucket/tfds
TXT
}

OPTIONS="--name --zone --project --node-id --config --workdir --env --tfds-data-dir
  --libtpu-init-args --log-file --remote-dir --venv"
parse_args "$@"
check_run_args

step_run
