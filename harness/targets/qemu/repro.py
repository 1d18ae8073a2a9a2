"""A qemu-target finding's artifacts: replay its reproducer on QEMU, rebuild the crash image, write it with a shell script."""

from __future__ import annotations

import re
from pathlib import Path

from harness.crashstates import CrashImageBuilder, CrashState
from harness.targets import RecoveryPath
from harness.targets.qemu.script import write_reproducer
from harness.targets.qemu.target import QemuTarget

__all__ = ["write_artifacts", "artifacts_beside"]


def write_artifacts(rep, directory: str | Path, stem: str, target: QemuTarget | None = None) -> Path | None:
    """Replay `rep` (a harness.fuzz.corpus.Reproducer) on QEMU; write `<stem>.qcow2` and `<stem>.sh`.

    Returns the script's path, or None when the replay no longer fails (nothing to show).
    """
    from harness.runner import Runner  # the runner imports the targets package: import it late

    target = target or QemuTarget()
    runner = Runner(rep.config, seed=rep.seed, budget=rep.budget, target=target)
    try:
        findings = runner.run(rep.ops)
        if not findings:
            return None
        finding = findings[0]
        crash_id = finding.crash_id
        if crash_id:
            image = bytes(CrashImageBuilder(target.log).build(CrashState.parse(crash_id)))
            inner = re.search(r"\(recovery crashed at \[([^\]]+)\]\)", finding.evidence)
            if inner:
                # The contract broke on a crash *of the recovery*: ship that image, made from the
                # recovery's own host log, so the script starts where the failing open starts.
                rec = target.recover(image, RecoveryPath.OPEN, target.options, record=True)
                if rec.log is not None:
                    image = bytes(CrashImageBuilder(rec.log).build(CrashState.parse(inner.group(1))))
                    crash_id = f"{crash_id}, then recovery crashed at {inner.group(1)}"
        else:
            target.close()
            image = target.contents()
        return write_reproducer(directory, stem, finding=finding, config=rep.config, history=target.history(),
                                crash_image=image, crash_id=crash_id, recovery="open",
                                version=target.bins.version, observed=finding.evidence)
    finally:
        target.release()


def artifacts_beside(json_path: str | Path, rep, spec) -> Path | None:
    """Write the crash image and script next to a recorded reproducer (same stem); a failure is reported, not raised."""
    import sys

    json_path = Path(json_path)
    target = spec.make()
    try:
        return write_artifacts(rep, json_path.parent, json_path.stem, target)
    except Exception as exc:  # noqa: BLE001 - the JSON reproducer is already safe on disk
        print(f"qcrash: {json_path}: could not write the QEMU reproducer script: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return None
    finally:
        target.release()
