"""Shell reproducers for qemu-target findings: the crash image plus the exact qemu-img / qemu-io commands, runnable without qcrash."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from harness.config import Config
from harness.oracle import Finding, Verdict

__all__ = ["write_reproducer", "breaking_commands"]

SECTOR = 512
IMAGE = "crash.qcow2"


_RECOVER = {
    "open": ['"$QEMU_IO" -f qcow2 -c close $W/work.qcow2   # a read-write open repairs a dirty image',
             '"$QEMU_IMG" check $W/work.qcow2 >/dev/null || "$QEMU_IMG" check -r leaks $W/work.qcow2'],
    "check-all": ['"$QEMU_IMG" check -r all $W/work.qcow2'],
    "check-leaks": ['"$QEMU_IMG" check -r leaks $W/work.qcow2'],
}
_CHECK = '"$QEMU_IMG" check $W/work.qcow2; echo "exit $?"'


def breaking_commands(finding: Finding, recovery: str | None) -> tuple[list[str], str]:
    """The commands whose result breaks the contract for this verdict, and what the contract expects of them."""
    v = finding.verdict
    recover = _RECOVER.get(recovery or "open", _RECOVER["open"])
    read = []
    if finding.sector is not None:
        read = [f'"$QEMU_IO" -r -f qcow2 -c "read -v {finding.sector * SECTOR} {SECTOR}" $W/work.qcow2']
    if v is Verdict.CORRUPTION_WITHOUT_DIRTY:
        return [_CHECK], "the dirty bit is clear on disk, so check exits 0 or 3 (leaks only)"
    if v in (Verdict.DATA_LOST, Verdict.FOREIGN_DATA, Verdict.GARBAGE) and finding.phase == "raw":
        return read, "the sector holds its durable value or a value written to it since (see the evidence)"
    if v is Verdict.READONLY_OPEN_CHANGED:
        return ["cp $W/work.qcow2 $W/before.qcow2", '"$QEMU_IMG" convert -f qcow2 -O raw $W/work.qcow2 /dev/null',
                "cmp $W/before.qcow2 $W/work.qcow2 && echo unchanged"], "a read-only open leaves the file unchanged"
    if v is Verdict.UNOPENABLE:
        return ['"$QEMU_IO" -r -f qcow2 -c "read 0 512" $W/work.qcow2'], "the crash image opens"
    if v is Verdict.REPAIR_FAILED:
        return recover, "recovery succeeds"
    if v is Verdict.CHECK_FAILED:
        return [_CHECK], "the image checks clean (exit 0)"
    if v in (Verdict.NOT_CLEAN_AFTER_REPAIR, Verdict.REPAIR_NOT_IDEMPOTENT):
        return recover + [_CHECK], "after recovery check exits 0 and the dirty bit is clear"
    return read + recover + read, "guest data after recovery equals what the read-only open read before it"


def write_reproducer(directory: str | os.PathLike[str], stem: str, *, finding: Finding, config: Config,
                     history: list[str], crash_image: bytes, crash_id: str | None, recovery: str | None,
                     version: str, observed: str = "") -> Path:
    """Write `<stem>.qcow2` (the crash image) and `<stem>.sh`; return the script's path.

    `history` is the qemu-img create line and the qemu-io commands the example ran (payload
    writes appear as `write -s FILE`; the script replays them with -P patterns, since only the
    crash image's bytes matter for the failing command and it is shipped as is).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.qcow2").write_bytes(crash_image)
    commands, expected = breaking_commands(finding, recovery)
    lines = [
        "#!/bin/sh",
        f"# qcrash qemu-target reproducer ({version}): {finding.verdict} - {finding.rule}",
        f"# configuration: {config}",
        f"# crash state: [{crash_id or finding.crash_id}]   recovery path: {recovery or '-'}",
        "# evidence: " + finding.evidence.replace("\n", " ")[:600],
        "set -u",
        'cd "$(dirname "$0")"',
        'QEMU_IMG=${QEMU_IMG:-qemu-img}; QEMU_IO=${QEMU_IO:-qemu-io}',
        'W=$(mktemp -d); trap \'rm -rf "$W"\' EXIT',
        "",
        "# 1. How the image was built (for reading; qcrash logged every host write of these through",
        "#    blklogwrites and applied the crash state above to make the shipped crash image):",
    ]
    lines += ["#    " + _pattern(cmd) for cmd in history]
    lines += [
        "",
        "# 2. The crash image, as the crash left it:",
        f'cp {shlex.quote(stem + ".qcow2")} "$W/work.qcow2"',
        "",
        f"# 3. The command whose result breaks the contract. Expected: {expected}.",
    ]
    if observed:
        lines += ["# Observed: " + observed.replace("\n", " ")[:600]]
    lines += commands
    path = out / f"{stem}.sh"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def _pattern(cmd: str) -> str:
    parts = cmd.split()
    if len(parts) >= 5 and parts[0] == "write" and "-s" in parts:
        i = parts.index("-s")
        return " ".join(parts[:i] + ["-P", "0x5a"] + parts[i + 2:])
    return cmd
