# shellcheck shell=bash
# shellcheck disable=SC2088  # "~/..." in the remote command lines is expanded on the worker.
# shellcheck disable=SC2034  # some option variables are read only by the scripts sourcing this
# Shared by the launch/ scripts (sourced, not run): option parsing, printing and running
# commands (with --dry-run), and the gcloud steps that create.sh, setup.sh, run.sh, logs.sh,
# teardown.sh and watch.sh put together. Every command is printed as "+ <command>" on stdout
# before it runs; progress messages go to stderr.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: bash >= 4.4 is needed (found $BASH_VERSION)" >&2
  exit 1
fi

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Files on each worker, relative to its home directory.
PID_FILE=blip2_jax.pid    # pid of the background run
EXIT_FILE=blip2_jax.exit  # the trainer's exit status, written when it ends

# ---- Option defaults: option --foo-bar sets FOO_BAR ------------------------------------------
NAME="" ZONE="" PROJECT="" NODE_ID="" DRY_RUN=0
ACCELERATOR_TYPE="" RUNTIME_VERSION="" SPOT=0 RESERVED=0 NO_WAIT=0 INTERVAL=60
SRC="$(cd "$LAUNCH_DIR/.." && pwd)" REMOTE_DIR=blip2_jax VENV=venv PYTHON=3.12 CODE_ONLY=0
CONFIG="" WORKDIR="" LOG_FILE=blip2_jax.log
WORKER=0 LINES=100 NO_FOLLOW=0 ASYNC=0
MAX_RESTARTS=10 ATTACH=0 DELETE_WHEN_DONE=0
FAKE_STATES="${LAUNCH_FAKE_STATES:-}"
CREATE_FLAGS=() ENV_VARS=() EXTRA_ARGS=()
FLAG_OPTIONS=" --dry-run --spot --reserved --no-wait --code-only --no-follow --async --attach --delete-when-done "

# ---- Messages ----------------------------------------------------------------------------------
log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'error: %s\n\n' "$*" >&2; usage >&2; exit 2; }

# ---- Printing and running commands -------------------------------------------------------------
# quote WORD: WORD as the shell would need it typed (single quotes only when needed).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_all WORD...: the words quoted and joined by spaces (one shell command line).
quote_all() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}

show() { printf '+ %s\n' "$(quote_all "$@")"; }

# run CMD...: print CMD, then run it unless this is a dry run.
run() {
  show "$@"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}

# capture VAR CMD...: print CMD, run it (unless dry run) and store its stdout in VAR.
capture() {
  local __var=$1 __out=""
  shift
  show "$@"
  if ((!DRY_RUN)); then __out=$("$@") || { printf -v "$__var" '%s' "$__out"; return 1; }; fi
  printf -v "$__var" '%s' "$__out"
}

pause() { run sleep "$INTERVAL"; }

# ---- Option parsing ----------------------------------------------------------------------------
# parse_args "$@": reads --opt VALUE / --opt=VALUE / flags; each script sets OPTIONS (the
# options it accepts, space separated) and usage() first. Anything after "--" goes to EXTRA_ARGS.
parse_args() {
  local opt val
  while (($#)); do
    opt=$1
    case $opt in
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      --*=*) val=${opt#*=}; opt=${opt%%=*}; shift
        if [[ $FLAG_OPTIONS == *" $opt "* ]]; then usage_error "$opt takes no value"; fi ;;
      --*) shift
        if [[ $FLAG_OPTIONS == *" $opt "* ]]; then val=1
        elif (($#)); then val=$1; shift
        else usage_error "$opt needs a value"; fi ;;
      *) usage_error "unexpected argument: $opt" ;;
    esac
    if [[ " ${OPTIONS//[[:space:]]/ } --dry-run " != *" $opt "* ]]; then usage_error "unknown option: $opt"; fi
    set_option "$opt" "$val"
  done
  finish_args
}

set_option() {
  case $1 in
    --env)
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants KEY=VALUE, got: $2"
      ENV_VARS+=("$2") ;;
    --tfds-data-dir) ENV_VARS+=("TFDS_DATA_DIR=$2") ;;
    --libtpu-init-args) ENV_VARS+=("LIBTPU_INIT_ARGS=$2") ;;
    --create-flag) CREATE_FLAGS+=("$2") ;;
    --fake-states) FAKE_STATES=$2 ;;
    *) local var=${1#--}; var=${var//-/_}; printf -v "${var^^}" '%s' "$2" ;;
  esac
}

# Checks shared by all scripts, run once the options are read.
finish_args() {
  NODE_ID=${NODE_ID:-$NAME}
  SCOPE=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then SCOPE+=(--project="$PROJECT"); fi
  if [[ -n $FAKE_STATES ]] && ((!DRY_RUN)); then usage_error "--fake-states only works with --dry-run"; fi
  local n
  for n in INTERVAL LINES MAX_RESTARTS; do
    [[ ${!n} =~ ^[0-9]+$ ]] || usage_error "--$(tr 'A-Z_' 'a-z-' <<<"$n") wants a whole number, got: ${!n}"
  done
  [[ $WORKER =~ ^(all|[0-9]+(,[0-9]+)*)$ ]] || usage_error "--worker wants all, N or N,M,..., got: $WORKER"
  for n in REMOTE_DIR VENV LOG_FILE; do
    [[ ${!n} =~ ^[A-Za-z0-9._-][A-Za-z0-9._/-]*[A-Za-z0-9._-]$ ]] \
      || usage_error "--$(tr 'A-Z_' 'a-z-' <<<"$n") wants a path relative to the home directory, got: ${!n}"
  done
}

# require --opt...: usage error unless each option was given.
require() {
  local opt var
  for opt in "$@"; do
    var=${opt#--}; var=${var//-/_}; var=${var^^}
    [[ -n ${!var} ]] || usage_error "$opt is required"
  done
}

# ---- Queued resources --------------------------------------------------------------------------
# The runtime (software) version that goes with an accelerator type, from the Cloud TPU docs.
default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

check_create_args() {
  require --name --zone --accelerator-type
  if ((SPOT && RESERVED)); then usage_error "--spot and --reserved exclude each other"; fi
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") \
      || usage_error "no default runtime version for $ACCELERATOR_TYPE: pass --runtime-version"
  fi
}

step_create() {
  local args=(create "$NAME" --node-id="$NODE_ID" "${SCOPE[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  if ((SPOT)); then args+=(--spot); fi
  if ((RESERVED)); then args+=(--reserved); fi
  log "requesting $ACCELERATOR_TYPE slice $NAME in $ZONE"
  run gcloud compute tpus queued-resources "${args[@]}" "${CREATE_FLAGS[@]}"
}

# query_state: sets QR_STATE to the queued resource's state (ACTIVE, SUSPENDED, ...), NOT_FOUND,
# or UNKNOWN when gcloud fails otherwise. A dry run takes the next state of FAKE_STATES (comma
# separated) instead, and "" once they are used up.
query_state() {
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" --format='value(state.state)')
  show "${describe[@]}"
  if ((DRY_RUN)); then
    QR_STATE=${FAKE_STATES%%,*}
    if [[ $FAKE_STATES == *,* ]]; then FAKE_STATES=${FAKE_STATES#*,}; else FAKE_STATES=""; fi
  else
    local err out
    err=$(mktemp)
    if out=$("${describe[@]}" 2>"$err"); then
      QR_STATE=${out//[[:space:]]/}
    elif grep -qiE 'NOT_FOUND|not found' "$err"; then
      QR_STATE=NOT_FOUND
    else
      QR_STATE=UNKNOWN
      warn "describe failed: $(tr '\n' ' ' <"$err")"
    fi
    rm -f "$err"
  fi
  log "state of $NAME: ${QR_STATE:-(no more fake states)}"
}

# wait_active: poll until the slice is ACTIVE (returns 0) or FAILED/SUSPENDED/gone (returns 1).
wait_active() {
  while true; do
    query_state
    case $QR_STATE in
      ACTIVE | "") return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | NOT_FOUND) warn "$NAME is $QR_STATE"; return 1 ;;
      *) pause ;;
    esac
  done
}

step_delete() {
  local args=(delete "$NAME" "${SCOPE[@]}" --force --quiet)
  if ((ASYNC)); then args+=(--async); fi
  log "deleting $NAME (and its TPU VMs)"
  run gcloud compute tpus queued-resources "${args[@]}"
}

# ---- Work on the TPU VMs -----------------------------------------------------------------------
# tpu_ssh WORKER COMMAND: run COMMAND (a shell line) on the given workers.
tpu_ssh() { run gcloud compute tpus tpu-vm ssh "$NODE_ID" "${SCOPE[@]}" --worker="$1" --command="$2"; }

step_setup() {
  local tarball="${TMPDIR:-/tmp}/${NAME}-code.tar.gz" dir="~/$REMOTE_DIR" venv="~/$VENV"
  log "packing $SRC (files git does not ignore)"
  if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    local ls=(git -C "$SRC" ls-files -z --cached --others --exclude-standard)
    local tar=(tar -czf "$tarball" -C "$SRC" --null -T -)
    printf '+ %s | %s\n' "$(quote_all "${ls[@]}")" "$(quote_all "${tar[@]}")"
    if ((!DRY_RUN)); then "${ls[@]}" | "${tar[@]}"; fi
  else
    run tar -czf "$tarball" -C "$SRC" --exclude=.git --exclude=.venv --exclude=.cache .
  fi
  log "copying the code to every worker of $NODE_ID"
  run gcloud compute tpus tpu-vm scp "$tarball" "$NODE_ID:$REMOTE_DIR.tar.gz" "${SCOPE[@]}" --worker=all
  run rm -f "$tarball"
  local remote="rm -rf $dir && mkdir -p $dir && tar -xzf $dir.tar.gz -C $dir && rm -f $dir.tar.gz"
  if ((!CODE_ONLY)); then
    # uv brings its own Python when the image's (Ubuntu 22.04: 3.10) is older than the project needs.
    remote+=" && { test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
    remote+=" && ~/.local/bin/uv venv --allow-existing --python $PYTHON $venv"
    remote+=" && ~/.local/bin/uv pip install --python $venv/bin/python 'jax[tpu]' gcsfs -e $dir"
    log "making the environment $venv (Python $PYTHON, jax[tpu], the project, gcsfs) on every worker"
  fi
  tpu_ssh all "$remote"
}

# The shell line that frees the TPU on a worker: anything still holding the chips (an earlier or
# crashed run; /dev/accel* on v4 and older, /dev/vfio/* on v5e/v5p/v6e) would make libtpu fail
# to start, and a lock file left behind by a killed process has the same effect.
stale_cleanup_cmd() {
  printf '%s' "if [ -f ~/$PID_FILE ]; then kill -9 \$(cat ~/$PID_FILE) 2>/dev/null || true; fi" \
    "; sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9 || true" \
    "; sudo rm -f /tmp/libtpu_lockfile; rm -f ~/$PID_FILE ~/$EXIT_FILE"
}

check_run_args() {
  require --name --zone --config --workdir
  if [[ $WORKDIR != gs://* ]]; then
    warn "--workdir $WORKDIR is not on GCS: workers do not share it and a preemption loses it"
  fi
}

# Starts the trainer on every worker in the background, appending to ~/LOG_FILE. nohup (and the
# ignored SIGHUP in the wrapping subshell) keep it going when the ssh connection drops; the
# subshell writes the trainer's exit status to ~/EXIT_FILE when it ends.
step_run() {
  local main=(python -m blip2_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}")
  local job="cd ~/$REMOTE_DIR && nohup "
  if ((${#ENV_VARS[@]})); then job+="env $(quote_all "${ENV_VARS[@]}") "; fi
  job+="~/$VENV/bin/$(quote_all "${main[@]}")"
  local remote
  remote="$(stale_cleanup_cmd); ( trap '' HUP; $job; echo \$? > ~/$EXIT_FILE ) >> ~/$LOG_FILE 2>&1 < /dev/null & echo \$! > ~/$PID_FILE"
  log "starting the run on every worker of $NODE_ID (log: ~/$LOG_FILE)"
  tpu_ssh all "$remote"
}

# run_status: sets RUN_EXIT to the trainer's exit status on worker 0, or "" while it runs.
run_status() {
  RUN_EXIT=""
  capture RUN_EXIT gcloud compute tpus tpu-vm ssh "$NODE_ID" "${SCOPE[@]}" --worker=0 \
    --command="cat ~/$EXIT_FILE 2>/dev/null || true" || RUN_EXIT=""
  RUN_EXIT=$(tail -n 1 <<<"$RUN_EXIT" | tr -d '[:space:]')
}

step_logs() {
  local remote="tail -n $LINES"
  if ((!NO_FOLLOW)); then remote+=" -F"; fi
  remote+=" ~/$LOG_FILE"
  # Several workers' lines arrive interleaved: tag each with its host.
  # shellcheck disable=SC2016  # $(hostname) is for the worker's shell
  if [[ $WORKER != 0 ]]; then remote+=' | sed -u "s/^/[$(hostname)] /"'; fi
  tpu_ssh "$WORKER" "$remote"
}

# ---- Usage text pieces (each script's usage() puts together the ones it accepts) ---------------
help_common() {
  cat <<'EOF2'
Slice:
  --name NAME             queued resource name (required)
  --zone ZONE             e.g. us-west4-a (required)
  --project PROJECT       default: gcloud's configured project
  --node-id ID            TPU VM (node) name; default: NAME
  --dry-run               print the commands ("+ ..." lines) without running them
  -h, --help              this text
EOF2
}

help_create() {
  cat <<'EOF2'

Create:
  --accelerator-type T    e.g. v5litepod-16, v6e-8, v5p-32, v4-32 (required)
  --runtime-version V     default from T: v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5-lite (v5e),
                          v2-alpha-tpuv5 (v5p), tpu-ubuntu2204-base (v4 and older)
  --spot | --reserved     Spot VMs (preemptible) or the project's reservation
  --create-flag FLAG      extra flag for 'queued-resources create', repeatable
                          (e.g. --create-flag=--internal-ips)
  --interval SECONDS      how often to poll the queued resource state (default 60)
EOF2
}

help_setup() {
  cat <<'EOF2'

Set-up (on every worker):
  --src DIR               code to copy (default: this repository; files git does not ignore)
  --remote-dir DIR        where the code goes, under the home directory (default blip2_jax)
  --venv DIR              the virtual environment, under the home directory (default venv)
  --python VERSION        its Python version (default 3.12)
  --code-only             only copy the code; keep the existing environment
EOF2
}

help_run() {
  cat <<'EOF2'

Run (on every worker, in the background):
  --config SPEC           the trainer's --config, relative to the code (required)
  --workdir DIR           the trainer's --workdir, normally gs://... (required)
  --env KEY=VALUE         environment variable for the trainer, repeatable
  --tfds-data-dir DIR     same as --env TFDS_DATA_DIR=DIR
  --libtpu-init-args A    same as --env LIBTPU_INIT_ARGS=A
  --log-file FILE         log under the home directory (default blip2_jax.log)
  -- ARGS...              further arguments for the trainer (e.g. --config.total_steps=1000)
EOF2
}
