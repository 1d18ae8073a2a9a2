"""Recovery of a crash image by each user path (read-write open, `check -r all`, `check -r leaks`), with the recovery's own host log."""

from __future__ import annotations

from collections.abc import Iterable

from harness.targets import OpenOptions, RecoveryPath
from harness.targets.qemu.hostlog import Converter
from harness.targets.qemu.tools import Judge

__all__ = ["recover_file", "gist"]


def recover_file(judge: Judge, image: str, conv: Converter, path: RecoveryPath, options: OpenOptions,
                 messages: list[str], events: list[str]) -> str | None:
    """Recover the image file at `image` by `path`, logging into `conv`; None, or why recovery failed."""
    if path is RecoveryPath.OPEN:
        return _by_open(judge, image, conv, options, messages, events)
    return _by_check(judge, image, conv, "all" if path is RecoveryPath.CHECK_ALL else "leaks", messages, events)


def _by_open(judge: Judge, image: str, conv: Converter, options: OpenOptions, messages: list[str],
             events: list[str]) -> str | None:
    """Open read-write (QEMU repairs a dirty image), then `check -r leaks` when leaks remain."""
    error, lines = judge.open_rw(image, conv, str(options.cache_mode), options.lazy_refcounts)
    messages += lines
    if error:
        return f"read-write open failed: {error}"
    if any("Rebuilding refcount structure" in m for m in lines):
        events.append("refcount rebuild")
    if any(m.startswith(("ERROR", "Repairing", "Leaked")) for m in lines):
        events.append("repaired on open")
    with open(image, "rb") as f:
        now = f.read()
    known = judge.cached_check(now)
    if known is None and judge.quick_clean(now):
        known = judge.check(now)  # cached by quick_clean's success: no process started
    if known is not None and not known.leaks:
        return None  # the check of these very bytes is known and finds no leaks: nothing to do
    # Leaks only are repaired with `check -r leaks`; run it at once instead of check first:
    # it changes nothing when there are no leaks, and it reports the state it leaves.
    if known is None or (not known.corruptions and not known.check_errors):
        run, summary = judge.check_fix(image, conv, "leaks")
        messages += run.lines
        if summary.leaks_fixed:
            events.append("leaks repaired")
    return None


def _by_check(judge: Judge, image: str, conv: Converter, mode: str, messages: list[str],
              events: list[str]) -> str | None:
    """`qemu-img check -r <mode>`: a check that could not complete is a failed recovery."""
    run, summary = judge.check_fix(image, conv, mode)
    messages += run.lines
    if any("Rebuilding refcount structure" in m for m in run.lines):
        events.append("refcount rebuild")
    if summary.leaks_fixed:
        events.append("leaks repaired")
    if run.rc == 1 or summary.check_errors:
        return f"qemu-img check -r {mode} exited {run.rc}: " + gist(run.lines)
    return None


def gist(lines: Iterable[str]) -> str:
    """QEMU's summary lines first (per-cluster ERROR/Leaked/Repairing lines can run to thousands), then a count of the rest."""
    lines = list(lines)
    per_cluster = [m for m in lines if m.startswith(("ERROR cluster", "Leaked cluster", "Repairing cluster"))]
    summary = [m for m in lines if m not in per_cluster and not m.lstrip().startswith(("{", "}", '"'))]
    text = " ".join(summary)
    if per_cluster:
        text += f" ({len(per_cluster)} per-cluster lines, first: {per_cluster[0]})"
    return text[:600]
