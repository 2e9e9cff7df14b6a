"""Scripts in gloo processes on the CPU, for the tests of distributed training: each test's processes
get a port free when they start (a fixed one may be taken by another run) and kfuse's own tree."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import kfuse

TESTS = os.path.dirname(__file__)
PYTHON = os.path.dirname(os.path.dirname(kfuse.__file__))  # the tree whose kfuse the tests import


def env() -> dict[str, str]:
    """The environment of a group's processes: a port free now, one OpenMP thread each."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def run_one(script: str, tmp_path: Path, timeout: float = 240) -> str:
    """Runs ``script`` (which calls ``init_process_group("gloo", rank=0, world_size=1)``) in one process with
    ``tests/`` and kfuse's tree importable; returns its stdout, failing the test on a non-zero exit."""
    path = tmp_path / "gloo_script.py"
    path.write_text(f"import sys\nsys.path[:0] = [{PYTHON!r}, {TESTS!r}]\n" + script)
    run = subprocess.run([sys.executable, str(path)], env=env(), capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
