"""What runs around qcow2_check_refcounts: qemu-img check's open, repair, double check, and the dirty and corrupt bits.

Deliberate differences from QEMU, for crash safety or bounded cost:

- fixed refcount blocks are written and flushed before the OFLAG_COPIED repair, not on
  close (only visible when the check later dies on a fatal corruption event);
- a "refcount block is outside image" repair grows the file by at most `max_growth`
  bytes (QEMU tries any size and lets the host file system refuse);
- the caller, not close, clears the dirty bit, and only by QEMU's check rule (qemu-img
  7.2 `check -r leaks` on a dirty image that needs a rebuild clears it on close anyway);
- a cluster whose refcount a repair drops to 0 is discarded by qemu-img check (hole
  punched); the block-file seam has no discard, so it is overwritten with zeros instead;
- QEMU clears the dirty and corrupt bits whenever the first pass ends with 0 corruptions
  and 0 check errors, even after "ERROR rebuilt refcount structure is still broken"
  (whose counts QEMU throws away) and even when the double check then finds corruptions;
  qcrash keeps the bits set in both cases, so a repair never calls a corrupt image clean.
"""

from __future__ import annotations

import dataclasses
import errno
import os

from models.blockio import BlockFile, WriteSite, read_exact
from models.qcow2 import spec
from models.qcow2.check.pasteof import extend_to_references
from models.qcow2.check.refcounts import run_check
from models.qcow2.check.result import CheckCounts, CheckResult, Finding, Fix, Kind
from models.qcow2.check.state import CheckState
from models.qcow2.header import ParsedHeader, read_header
from models.qcow2.structs import FIELD_OFFSET

__all__ = ["MAX_REPAIR_GROWTH", "check", "repair", "clear_dirty_bit", "mark_clean_if_repaired"]

MAX_REPAIR_GROWTH = 64 << 20  # default bound on one "refcount block is outside image" file growth


def check(file: BlockFile, fix: Fix = Fix.NONE, *, path: str | None = None,
          max_growth: int | None = MAX_REPAIR_GROWTH, parsed: ParsedHeader | None = None,
          double_check: bool = True) -> CheckResult:
    """Check (and with `fix`, repair) the qcow2 image in `file` exactly as `qemu-img check [-r ...]` does.

    `parsed` is the header as `read_header` returned it (read here when None), as QEMU's
    check runs on the already-opened image. Never touches the dirty bit: see `repair()`
    and `mark_clean_if_repaired()`. Raises InvalidImage / UnsupportedFeature where QEMU
    would refuse to open the image at all ("Could not open ...", exit 1).

    `max_growth` bounds how far a "refcount block is outside image" repair may extend the
    file in one step (QEMU tries any size and lets the host file system refuse); None
    removes the bound, which is only sensible for sparse host files.

    `double_check=False` skips qemu-img's re-check after a repair ("Double checking the
    fixed image now..."): QEMU's open-time repair of a dirty image (qcow2_do_open ->
    qcow2_co_check_locked) runs the repairing pass alone.
    """
    fix = Fix(fix)
    name = path if path is not None else file.name
    if parsed is None:
        parsed = read_header(file, writable=bool(fix), check_mode=True)
    findings: list[Finding] = []
    if fix & Fix.ERRORS:
        extend_to_references(file, parsed, findings, max_growth)
    state = CheckState(file, name, parsed, findings, max_growth)
    try:
        res, error = run_check(state, int(fix))
        result = CheckResult.from_counts(res, findings, fix)
        result.error = error
        result.rebuilt = state.rebuilt
        result.consistent_after_fix = (bool(fix) and error is None and res.check_errors == 0 and res.corruptions == 0
                                       and not _still_broken(state, findings))
        if double_check and error is None and (res.corruptions_fixed or res.leaks_fixed):
            result = _double_check(state, result, res)
    finally:
        state.release()
    return result


def _still_broken(state: CheckState, findings: list[Finding]) -> bool:
    """Whether the rebuild printed "rebuilt refcount structure is still broken" (QEMU counts nothing for it)."""
    return state.rebuilt and any(x.kind is Kind.REBUILD_BROKEN for x in reversed(findings))


def _double_check(state: CheckState, result: CheckResult, res: CheckCounts) -> CheckResult:
    """qemu-img: "Double checking the fixed image now..." on the same, still open image (no header re-validation)."""
    first = dataclasses.replace(result, findings=list(result.findings))
    if state.drv_dead:
        second, second_error = CheckCounts(), os.strerror(errno.ENOMEDIUM)
    else:
        second, second_error = run_check(state, 0)
    final = CheckResult.from_counts(second, result.findings, result.fix)
    final.corruptions_fixed = res.corruptions_fixed
    final.leaks_fixed = res.leaks_fixed
    final.error = second_error
    final.rebuilt = result.rebuilt
    final.double_checked = True
    final.consistent_after_fix = (result.consistent_after_fix and second_error is None
                                  and second.corruptions == 0 and second.check_errors == 0)
    final.first_pass = first
    return final


def clear_dirty_bit(file: BlockFile) -> bool:
    """Clear the dirty and corrupt bits (qcow2_mark_clean + qcow2_mark_consistent): pwrite the feature field, then flush.

    Returns whether anything was written (v2 images have no feature bits).
    """
    version = int.from_bytes(read_exact(file, FIELD_OFFSET["version"], 4), "big")
    if version < 3:
        return False
    start = FIELD_OFFSET["incompatible_features"]
    incompat = int.from_bytes(read_exact(file, start, 8), "big")
    bits = int(spec.IncompatFeature.DIRTY | spec.IncompatFeature.CORRUPT)
    if not incompat & bits:
        return False
    file.pwrite(start, (incompat & ~bits).to_bytes(8, "big"), WriteSite.DIRTY_BIT)
    file.flush()
    return True


def mark_clean_if_repaired(file: BlockFile, result: CheckResult) -> bool:
    """QEMU's rule: after a check with fix requested that left 0 corruptions and 0 check errors, clear the dirty and corrupt bits.

    The caller (the image's open path, the CLI) calls this after `check(..., fix)`;
    `check()` itself never touches the bits. Returns whether the header was written.
    """
    if not result.consistent_after_fix:
        return False
    return clear_dirty_bit(file)


def repair(file: BlockFile, fix: Fix = Fix.ALL, *, path: str | None = None,
           max_growth: int | None = MAX_REPAIR_GROWTH, parsed: ParsedHeader | None = None,
           double_check: bool = True) -> CheckResult:
    """check(file, fix), then clear the dirty/corrupt bits when QEMU would (see mark_clean_if_repaired)."""
    result = check(file, fix, path=path, max_growth=max_growth, parsed=parsed, double_check=double_check)
    mark_clean_if_repaired(file, result)
    return result
