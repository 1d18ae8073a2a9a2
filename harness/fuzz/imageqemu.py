"""Side by side with QEMU 7.2 on one malformed image: qemu-img check and qemu-io against the library, and (sampled) qcrash's own CLI.

Compared, per image (each tool on its own copy):

- **open for check**: does `qemu-img check` open the image (no "Could not open")? does
  qcrash's check (the library step `check`)?
- **read-write use**: does `qemu-io -c "write -P 0x11 0 512"` succeed, and does it mark
  the image corrupt? does the library's `open-rw` step succeed, and does it log a fatal
  corruption event ("Marking image as corrupt": an overlap, an unaligned table, ...)?

A difference is a *disagreement* with a short, normalised reason, so the run can list each
kind once with a count. The CLI check (`python -m harness img check`, `io -c write`) is
classified like a library step: exit status 70, "internal error" or a traceback is an
unexpected exception.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.fuzz import imagecase
from harness.fuzz.imagecase import Step

REPO = str(Path(__file__).resolve().parents[2])


def qemu_available() -> bool:
    return bool(shutil.which("qemu-img") and shutil.which("qemu-io"))


@dataclasses.dataclass
class QemuView:
    check_opens: bool
    check_rc: int
    check_message: str
    check_seconds: float
    write_ok: bool
    write_corrupt: bool
    write_message: str
    write_seconds: float


def _run(cmd: list[str], timeout: float = 60.0) -> tuple[subprocess.CompletedProcess | None, float]:
    start = time.perf_counter()
    env = {**os.environ, "LC_ALL": "C", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start
    return proc, time.perf_counter() - start


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")[:200]


def write_commands(raw: bytes) -> list[str]:
    """The writes the library's open-rw step makes (imagecase.step_open_rw), as qemu-io commands (at least one)."""
    if len(raw) < 32:
        return ["write -P 0x11 0 512"]
    cluster_bits, size = int.from_bytes(raw[20:24], "big"), int.from_bytes(raw[24:32], "big")
    if not 9 <= cluster_bits <= 21:
        return ["write -P 0x11 0 512"]
    cs = 1 << cluster_bits
    out = [f"write -P {byte:#x} {off} {length}" for off, length, byte in imagecase.planned_writes(size, cs)]
    # No guest byte to write (a 0-byte disk): the library step still opens read-write and
    # flushes, so qemu-io must still open the image (a bare "not run" would count as success).
    return out or ["flush"]


def qemu_view(raw: bytes) -> QemuView:
    with tempfile.TemporaryDirectory(prefix="qcrash-hostile-") as tmp:
        a, b = Path(tmp) / "check.qcow2", Path(tmp) / "write.qcow2"
        a.write_bytes(raw)
        b.write_bytes(raw)
        chk, chk_s = _run(["qemu-img", "check", "-f", "qcow2", str(a)])
        cmds = [a for c in write_commands(raw) for a in ("-c", c)]
        wr, wr_s = _run(["qemu-io", "-f", "qcow2", *cmds, str(b)])
    chk_err = chk.stderr if chk else "timeout"
    wr_out = (wr.stdout + wr.stderr) if wr else "timeout"
    return QemuView(
        check_opens=chk is not None and "Could not open" not in chk_err,
        check_rc=chk.returncode if chk else -1,
        check_message=_first_line(chk_err) if chk and "Could not open" in chk_err else "",
        check_seconds=chk_s,
        write_ok=wr is not None and wr.returncode == 0 and "failed" not in wr_out and "Could not open" not in wr_out,
        write_corrupt="Marking image as corrupt" in wr_out,
        write_message=_first_line(wr.stderr if wr else ""),
        write_seconds=wr_s,
    )


def _norm(text: str) -> str:
    """A message with numbers, offsets and paths taken out, so one kind of reason counts once."""
    text = re.sub(r"'[^']*'|/\S+", "F", text)
    text = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", text)
    return text[:140]


def disagreements(steps: dict[str, Step], q: QemuView) -> list[str]:
    """Normalised reasons where qcrash's library and QEMU differ on this image."""
    out = []
    check = steps.get("check")
    if check is not None and check.cls in ("result", "named"):
        ours = check.cls == "result"
        if ours != q.check_opens:
            if q.check_opens:
                out.append(f"check: qemu-img opens it, qcrash refuses: {_norm(check.detail.split(': ', 1)[-1])}")
            else:
                out.append(f"check: qemu-img refuses ({_norm(q.check_message)}), qcrash opens it")
    rw = steps.get("open-rw")
    if rw is not None and rw.cls in ("result", "named"):
        ours_ok = rw.cls == "result"
        ours_corrupt = rw.corrupt
        if ours_ok != q.write_ok:
            if q.write_ok:
                out.append(f"write: qemu-io writes, qcrash refuses: {_norm(rw.detail.split(': ', 1)[-1])}")
            else:
                out.append(f"write: qemu-io refuses ({_norm(q.write_message)}), qcrash writes")
        elif not ours_ok and ours_corrupt != q.write_corrupt:
            out.append(f"write: both refuse, corrupt bit: qemu {q.write_corrupt}, qcrash {ours_corrupt}")
    return out


def cli_steps(raw: bytes) -> list[Step]:
    """qcrash's own CLI on the image: `img check` and `io -c write`; exit 70 or a traceback is unexpected."""
    steps = []
    with tempfile.TemporaryDirectory(prefix="qcrash-hostile-cli-") as tmp:
        for name, args in (("cli-check", ["img", "check"]), ("cli-write", ["io", "-c", "write -P 0x11 0 512"])):
            path = Path(tmp) / f"{name}.qcow2"
            path.write_bytes(raw)
            proc, seconds = _run([sys.executable, "-m", "harness", *args, str(path)])
            if proc is None:
                steps.append(Step(name, "over-time", "the CLI ran past 60 s", seconds))
            elif proc.returncode == 70 or "Traceback" in proc.stderr or "internal error" in proc.stderr:
                steps.append(Step(name, "unexpected", _first_line(proc.stderr), seconds))
            else:
                steps.append(Step(name, "result" if proc.returncode == 0 else "named", _first_line(proc.stderr), seconds))
    return steps
