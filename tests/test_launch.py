"""launch/ TPU scripts: shellcheck, usage texts, the exact gcloud commands each issues in --dry-run
(including a simulated Spot preemption in watch.sh), and the remote command lines executed for
real in a scratch home directory with stand-ins for gcloud, sudo and the trainer."""
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "teardown.sh", "watch.sh"]

QR = ["gcloud", "compute", "tpus", "queued-resources"]
VM = ["gcloud", "compute", "tpus", "tpu-vm"]
SCOPE = ["--zone=us-west4-a"]
DESCRIBE = QR + ["describe", "blip2"] + SCOPE + ["--format=value(state.state)"]
CREATE_V5E_SPOT = QR + ["create", "blip2", "--node-id=blip2"] + SCOPE + [
    "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
DELETE = QR + ["delete", "blip2"] + SCOPE + ["--force", "--quiet"]
SETUP_LINE = (
    "rm -rf ~/blip2_jax && mkdir -p ~/blip2_jax && tar -xzf ~/blip2_jax.tar.gz -C ~/blip2_jax"
    " && rm -f ~/blip2_jax.tar.gz"
    " && { test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
    " && ~/.local/bin/uv venv --allow-existing --python 3.12 ~/venv"
    " && ~/.local/bin/uv pip install --python ~/venv/bin/python 'jax[tpu]' gcsfs -e ~/blip2_jax")
CLEANUP_LINE = (
    "if [ -f ~/blip2_jax.pid ]; then kill -9 $(cat ~/blip2_jax.pid) 2>/dev/null || true; fi"
    "; sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9 || true"
    "; sudo rm -f /tmp/libtpu_lockfile; rm -f ~/blip2_jax.pid ~/blip2_jax.exit")
RUN_ARGS = ["--config=configs/stage1_pretrain.py", "--workdir=gs://bkt/blip2/stage1"]
RUN_LINE = (
    CLEANUP_LINE + "; ( trap '' HUP; cd ~/blip2_jax && nohup ~/venv/bin/python -m blip2_jax.main"
    " --config=configs/stage1_pretrain.py --workdir=gs://bkt/blip2/stage1"
    "; echo $? > ~/blip2_jax.exit ) >> ~/blip2_jax.log 2>&1 < /dev/null & echo $! > ~/blip2_jax.pid")
STATUS = VM + ["ssh", "blip2"] + SCOPE + ["--worker=0", "--command=cat ~/blip2_jax.exit 2>/dev/null || true"]


def launch(script, *args, env=None):
    e = {k: v for k, v in os.environ.items() if k != "LAUNCH_FAKE_STATES"}
    e.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=e, timeout=60, cwd=ROOT)


def commands(proc):
    """The '+ ' lines of a run, each split into words as the shell would."""
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def base(*extra):
    return ["--name", "blip2", "--zone", "us-west4-a", "--dry-run", *extra]


def ssh_all(line):
    return VM + ["ssh", "blip2"] + SCOPE + ["--worker=all", f"--command={line}"]


def setup_cmds(src, tmp, line=SETUP_LINE):
    tarball = f"{tmp}/blip2-code.tar.gz"
    return [
        ["git", "-C", str(src), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "|",
         "tar", "-czf", tarball, "-C", str(src), "--null", "-T", "-"],
        VM + ["scp", tarball, "blip2:blip2_jax.tar.gz"] + SCOPE + ["--worker=all"],
        ["rm", "-f", tarball],
        ssh_all(line),
    ]


# ---- Static checks --------------------------------------------------------------------------------
def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    files = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.glob("*.sh"))
    assert len(files) == len(SCRIPTS) + 1  # + common.sh
    proc = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage(script):
    assert os.access(LAUNCH / script, os.X_OK)
    assert "set -euo pipefail" in (LAUNCH / script).read_text()
    helped = launch(script, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith(f"Usage: launch/{script}")
    assert "--dry-run" in helped.stdout
    missing = launch(script, "--dry-run")
    assert missing.returncode == 2
    assert "error: --name is required" in missing.stderr and f"Usage: launch/{script}" in missing.stderr
    assert "+ " not in missing.stdout
    unknown = launch(script, *base("--bogus", "1"))
    assert unknown.returncode == 2 and "unknown option: --bogus" in unknown.stderr


def test_bad_values_are_usage_errors():
    create = ["--accelerator-type", "v5litepod-16"]
    for args in (["--spot", "--reserved"], ["--interval", "soon"], ["--spot=yes"], ["--zone"]):
        proc = launch("create.sh", *base(*create, *args))
        assert proc.returncode == 2, args
    assert launch("create.sh", *base("--accelerator-type", "tpu9-8")).returncode == 2
    assert launch("logs.sh", *base("--worker", "first")).returncode == 2
    assert launch("run.sh", *base(*RUN_ARGS, "--env", "NOEQUALS")).returncode == 2
    assert launch("run.sh", *base(*RUN_ARGS, "--remote-dir", "/abs/path")).returncode == 2


# ---- create.sh / teardown.sh --------------------------------------------------------------------
def test_create_spot():
    proc = launch("create.sh", *base("--accelerator-type", "v5litepod-16", "--spot"))
    assert commands(proc) == [CREATE_V5E_SPOT, DESCRIBE]


def test_create_reserved_with_project_node_and_extra_flags():
    proc = launch("create.sh", "--name=blip2", "--zone=us-west4-a", "--project=my-proj",
                  "--node-id=blip2-node", "--accelerator-type=v4-32", "--runtime-version=custom-rt",
                  "--reserved", "--create-flag=--internal-ips", "--no-wait", "--dry-run")
    assert commands(proc) == [
        QR + ["create", "blip2", "--node-id=blip2-node", "--zone=us-west4-a", "--project=my-proj",
              "--accelerator-type=v4-32", "--runtime-version=custom-rt", "--reserved", "--internal-ips"]]


@pytest.mark.parametrize("accel,runtime", [
    ("v6e-8", "v2-alpha-tpuv6e"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"), ("v4-32", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base")])
def test_default_runtime_version(accel, runtime):
    create = commands(launch("create.sh", *base("--accelerator-type", accel, "--no-wait")))[0]
    assert f"--runtime-version={runtime}" in create and "--spot" not in create


def test_create_waits_until_active_and_fails_on_failed():
    args = base("--accelerator-type", "v5litepod-16", "--spot", "--interval", "7")
    waits = launch("create.sh", *args, "--fake-states", "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
    sleep = ["sleep", "7"]
    assert commands(waits) == [CREATE_V5E_SPOT, DESCRIBE, sleep, DESCRIBE, sleep, DESCRIBE]
    failed = launch("create.sh", *args, env={"LAUNCH_FAKE_STATES": "PROVISIONING,FAILED"})
    assert failed.returncode == 1 and "did not become ACTIVE" in failed.stderr


def test_fake_states_need_dry_run():
    proc = launch("create.sh", "--name=b", "--zone=z", "--accelerator-type=v4-8", "--fake-states=ACTIVE")
    assert proc.returncode == 2 and "only works with --dry-run" in proc.stderr


def test_teardown():
    assert commands(launch("teardown.sh", *base())) == [DELETE]
    assert commands(launch("teardown.sh", *base("--async"))) == [DELETE + ["--async"]]


# ---- setup.sh / run.sh / logs.sh ----------------------------------------------------------------
def test_setup(tmp_path):
    proc = launch("setup.sh", *base(), env={"TMPDIR": str(tmp_path)})
    assert commands(proc) == setup_cmds(ROOT, tmp_path)
    code_only = launch("setup.sh", *base("--code-only", "--src", str(tmp_path)), env={"TMPDIR": str(tmp_path)})
    # Not a git work tree: plain tar without the usual clutter.
    tarball = f"{tmp_path}/blip2-code.tar.gz"
    assert commands(code_only) == [
        ["tar", "-czf", tarball, "-C", str(tmp_path), "--exclude=.git", "--exclude=.venv", "--exclude=.cache", "."],
        *setup_cmds(ROOT, tmp_path, SETUP_LINE.split(" && {")[0])[1:]]


def test_run():
    assert commands(launch("run.sh", *base(*RUN_ARGS))) == [ssh_all(RUN_LINE)]


def test_run_environment_and_trainer_args():
    proc = launch("run.sh", *base(*RUN_ARGS, "--tfds-data-dir", "gs://bkt/tfds",
                                  "--libtpu-init-args", "--xla_tpu_a=true --xla_tpu_b=2",
                                  "--env", "WANDB_MODE=offline", "--", "--config.total_steps=10"))
    [cmd] = commands(proc)
    line = cmd[-1].removeprefix("--command=")
    assert cmd[:-1] == ssh_all("")[:-1] and line.startswith(CLEANUP_LINE + "; ")
    job = shlex.split(line[len(CLEANUP_LINE) + 2:].split(";")[1])
    assert job == ["cd", "~/blip2_jax", "&&", "nohup", "env", "TFDS_DATA_DIR=gs://bkt/tfds",
                   "LIBTPU_INIT_ARGS=--xla_tpu_a=true --xla_tpu_b=2", "WANDB_MODE=offline",
                   "~/venv/bin/python", "-m", "blip2_jax.main", *RUN_ARGS, "--config.total_steps=10"]


def test_run_warns_about_a_local_workdir():
    proc = launch("run.sh", *base("--config=c.py", "--workdir=/tmp/w"))
    assert proc.returncode == 0 and "not on GCS" in proc.stderr


def test_logs():
    tail = VM + ["ssh", "blip2"] + SCOPE
    assert commands(launch("logs.sh", *base())) == [tail + ["--worker=0", "--command=tail -n 100 -F ~/blip2_jax.log"]]
    assert commands(launch("logs.sh", *base("--worker=all", "--lines=5", "--no-follow"))) == [
        tail + ["--worker=all", '--command=tail -n 5 ~/blip2_jax.log | sed -u "s/^/[$(hostname)] /"']]


# ---- watch.sh (dry run) -------------------------------------------------------------------------
WATCH = ["--accelerator-type", "v5litepod-16", "--spot", "--interval", "30", *RUN_ARGS]


def test_watch_recreates_a_preempted_slice_and_restarts_the_run(tmp_path):
    states = "NOT_FOUND,ACTIVE,ACTIVE,SUSPENDED,PROVISIONING,ACTIVE"
    proc = launch("watch.sh", *base(*WATCH, "--fake-states", states), env={"TMPDIR": str(tmp_path)})
    sleep = ["sleep", "30"]
    up = [*setup_cmds(ROOT, tmp_path), ssh_all(RUN_LINE)]
    assert commands(proc) == [
        DESCRIBE, CREATE_V5E_SPOT, DESCRIBE, *up,       # not there yet: create, wait, set up, run
        sleep, DESCRIBE, STATUS,                        # ACTIVE, the run goes on
        sleep, DESCRIBE, DELETE, CREATE_V5E_SPOT,       # SUSPENDED: delete and request again
        DESCRIBE, sleep, DESCRIBE, *up,                 # PROVISIONING, ACTIVE: set up, same run
        sleep, DESCRIBE]                                # fake states used up: the dry run ends
    assert "restart 1 of at most 10" in proc.stderr


def test_watch_attach_and_bounded_restarts(tmp_path):
    env = {"TMPDIR": str(tmp_path), "LAUNCH_FAKE_STATES": "ACTIVE,ACTIVE"}
    attached = commands(launch("watch.sh", *base(*WATCH, "--attach"), env=env))
    assert attached == [DESCRIBE, ["sleep", "30"], DESCRIBE, STATUS, ["sleep", "30"], DESCRIBE]
    states = "ACTIVE,SUSPENDED,FAILED,FAILED"
    proc = launch("watch.sh", *base(*WATCH, "--attach", "--max-restarts", "1", "--fake-states", states), env=env)
    assert proc.returncode == 1 and "giving up: 1 restarts used" in proc.stderr
    issued = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert issued.count(CREATE_V5E_SPOT) == 1 and issued.count(DELETE) == 1


# ---- The remote command lines, executed -----------------------------------------------------------
FAKE_GCLOUD = r'''
import json, os, pathlib, shutil, subprocess, sys
home = pathlib.Path(os.environ["HOME"])
argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
verb = argv[2:4]
if verb[1] == "describe":
    states = pathlib.Path(os.environ["FAKE_GCLOUD_STATES"])
    left = states.read_text().split()
    state = left[0] if left else "ACTIVE"
    states.write_text("\n".join(left[1:]))
    if state == "NOT_FOUND":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found")
    print(state)
elif verb == ["tpu-vm", "scp"]:
    shutil.copy(argv[4], home / argv[5].split(":", 1)[1])
elif verb == ["tpu-vm", "ssh"]:
    command = next(a for a in argv if a.startswith("--command=")).removeprefix("--command=")
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home).returncode)
'''
FAKE_PYTHON = """#!/bin/sh
{ pwd; printf '%s\\n' "$@"; echo "LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS"; echo "QUOTED=$QUOTED"; } > ~/trainer.$$
echo trainer says hello
# The first run after ~/crash_once was made fails.
if [ -e ~/crash_once ]; then rm ~/crash_once; exit 5; fi
exit "${FAKE_EXIT:-0}"
"""


@pytest.fixture
def worker(tmp_path):
    """A scratch home directory (the 'worker') and a PATH with stand-ins for gcloud and sudo."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    (bin_dir / "sudo").write_text('#!/bin/sh\necho "$@" >> "$HOME/sudo.log"\n')
    (home / "venv" / "bin" / "python").write_text(FAKE_PYTHON)
    for exe in (bin_dir / "gcloud", bin_dir / "sudo", home / "venv" / "bin" / "python"):
        exe.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"), "FAKE_GCLOUD_STATES": str(tmp_path / "states")}
    return home, env


def wait_for(path, timeout=20.0):
    end = time.time() + timeout
    while not path.exists() or not path.read_text().strip():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text().strip()


def test_run_line_on_a_worker(worker):
    home, env = worker
    (home / "blip2_jax").mkdir()
    (home / "blip2_jax.exit").write_text("1\n")  # left over from an earlier run
    stale = subprocess.Popen(["sleep", "600"])
    (home / "blip2_jax.pid").write_text(f"{stale.pid}\n")
    try:
        proc = launch("run.sh", "--name=blip2", "--zone=us-west4-a", *RUN_ARGS,
                      "--libtpu-init-args=--xla_a=true --xla_b=2", "--env", "QUOTED=it's \"here\"",
                      "--", "--config.total_steps=10", env={**env, "FAKE_EXIT": "3"})
        assert proc.returncode == 0, proc.stderr
        assert stale.wait(timeout=10) == -9  # the earlier run was stopped
    finally:
        if stale.poll() is None:
            stale.kill()
    assert wait_for(home / "blip2_jax.exit") == "3"
    [record] = home.glob("trainer.*")
    assert record.read_text().splitlines() == [
        str(home / "blip2_jax"), "-m", "blip2_jax.main", *RUN_ARGS, "--config.total_steps=10",
        "LIBTPU_INIT_ARGS=--xla_a=true --xla_b=2", "QUOTED=it's \"here\""]
    assert "trainer says hello" in (home / "blip2_jax.log").read_text()
    assert "rm -f /tmp/libtpu_lockfile" in (home / "sudo.log").read_text()


@pytest.mark.parametrize("states,crash,creates,trainers", [
    ("NOT_FOUND ACTIVE SUSPENDED ACTIVE", False, 2, 2),  # preempted once: delete, create, again
    ("NOT_FOUND PROVISIONING ACTIVE", True, 1, 2),       # the run fails once: start it again
])
def test_watch_for_real_with_stand_in_gcloud(worker, tmp_path, states, crash, creates, trainers):
    home, env = worker
    src = tmp_path / "src"
    (src / "blip2_jax").mkdir(parents=True)
    (src / "blip2_jax" / "__init__.py").write_text("")
    (src / ".gitignore").write_text("ignored.txt\n")
    (src / "ignored.txt").write_text("x")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(src)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "blip2_jax", ".gitignore"], check=True)
    (src / "untracked.py").write_text("")
    (tmp_path / "states").write_text(states.replace(" ", "\n"))  # then ACTIVE for ever
    if crash:
        (home / "crash_once").write_text("")
    proc = launch("watch.sh", "--name=blip2", "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
                  "--spot", *RUN_ARGS, "--interval=0", "--src", str(src), "--code-only",
                  "--delete-when-done", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "the run has finished" in proc.stderr
    assert ("the run exited with status 5" in proc.stderr) == crash
    calls = [json.loads(line) for line in (tmp_path / "gcloud.log").read_text().splitlines()]
    assert calls[:2] == [DESCRIBE[1:], CREATE_V5E_SPOT[1:]]
    assert calls.count(CREATE_V5E_SPOT[1:]) == creates
    assert calls.count(DELETE[1:]) == creates  # one per preemption, one at the end
    assert calls[-1] == DELETE[1:] and calls[-2] == STATUS[1:]
    assert calls.count(ssh_all(RUN_LINE)[1:]) == trainers
    assert sorted(p.name for p in (home / "blip2_jax").rglob("*")) == [
        ".gitignore", "__init__.py", "blip2_jax", "untracked.py"]
    assert len(list(home.glob("trainer.*"))) == trainers
    assert (home / "blip2_jax.exit").read_text().strip() == "0"
