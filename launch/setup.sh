#!/usr/bin/env bash
# Copies the code to every worker of a slice and makes its Python environment there.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'TXT'
Usage: launch/setup.sh --name NAME --zone ZONE [options]

Copies the code to every worker (scp of a tarball of the files git does not ignore) and makes a
virtual environment there with jax[tpu], the project (editable) and gcsfs.

TXT
  help_common
  help_setup
  cat <<'TXT'

Example:
  launch/setup.sh --name blip2 --zone us-west4-a
  launch/setup.sh --name blip2 --zone us-west4-a --code-only   # after editing the code
TXT
}

OPTIONS="--name --zone --project --node-id --src --remote-dir --venv --python --code-only"
parse_args "$@"
require --name --zone

step_setup
