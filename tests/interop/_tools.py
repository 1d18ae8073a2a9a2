"""Running the real and the work-alike tools from the interop tests: one environment, one runner that checks the exit status, and the qcrash CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
# C locale and UTC: QEMU's and qcrash's outputs (sizes, snapshot dates) are compared byte for byte.
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "LC_ALL": "C", "TZ": "UTC"}


def sh(*cmd, rc: int | None = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command in ENV; unless rc is None, assert its exit status, showing its output on failure."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, timeout=timeout)
    if rc is not None:
        assert proc.returncode == rc, f"{cmd}: rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def qcrash(*args, rc: int | None = 0) -> subprocess.CompletedProcess:
    """The qcrash CLI (`python -m harness ...`); a Python traceback is always a failure."""
    proc = sh(sys.executable, "-m", "harness", *args, rc=rc)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc
