"""The real-qemu-img cross-check: qcrash's `check` and `qemu-img check` must agree on a crash image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from models.blockio import MemoryFile
from models.qcow2 import check as checkmod

QEMU_IMG_TIMEOUT = 60  # seconds; a hung qemu-img is a harness problem, not a verdict


def qemu_disagreement(raw: bytes) -> str | None:
    """Run real `qemu-img check` on a crash image; describe any difference from qcrash's check, else None.

    Without qemu-img on PATH there is nothing to compare against: None.
    """
    if shutil.which("qemu-img") is None:
        return None
    # Looked up through the module at call time, so a test can swap in a wrong checker.
    ours = checkmod.check(MemoryFile(raw))
    proc = _run_qemu_img_check(raw)
    try:
        theirs = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return f"qemu-img check exited {proc.returncode} without JSON: {proc.stderr.strip()[:200]}"
    mine = {"corruptions": ours.corruptions, "leaks": ours.leaks, "check-errors": ours.check_errors}
    got = {k: theirs.get(k, 0) for k in mine}
    if mine != got or checkmod.exit_code(ours) != proc.returncode:
        return f"qcrash check {mine} (exit {checkmod.exit_code(ours)}) but qemu-img check {got} (exit {proc.returncode})"
    return None


def _run_qemu_img_check(raw: bytes) -> subprocess.CompletedProcess[str]:
    fd, path = tempfile.mkstemp(suffix=".qcow2")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return subprocess.run(["qemu-img", "check", "-f", "qcow2", "--output=json", path],
                              capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    finally:
        os.unlink(path)
