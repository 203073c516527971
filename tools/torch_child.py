"""The PyTorch side of the benchmarks: a child interpreter (one with torch) that answers each
request line on stdin with one JSON line, so that the two sides can alternate run by run and
see the same machine load."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def torch_env(omp_wait: str = "passive") -> dict:
    env = dict(os.environ, TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    if omp_wait == "passive":
        # OpenMP's default spin-waiting collapses (10-30x) when other processes share the cores;
        # sleeping waits keep the reference's timings meaningful on a shared machine.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


class JsonLineChild:
    """`cmd` started with `env`; its first JSON line is `info`; `request(line)` -> the next."""

    def __init__(self, cmd: list[str], env: dict):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the PyTorch side exited (code {self.proc.wait()})")
        return json.loads(line)

    def request(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()
