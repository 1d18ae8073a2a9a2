"""Verdicts (a closed set) and findings: what broke, where, and the evidence, as data."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json

from harness import serial


class Verdict(enum.StrEnum):
    """Every way the contract (harness/CRASH-CONTRACT.md, shipped with the repository) can break; one per rule."""

    DATA_LOST = "data-lost"  # a sector lost a durable value (reads an older value or zeros)
    FOREIGN_DATA = "foreign-data"  # a sector shows another sector's or another op's data
    GARBAGE = "garbage"  # a sector shows bytes no guest op ever wrote
    READ_MISMATCH = "read-mismatch"  # without a crash, a read differs from the model
    CORRUPTION_WITHOUT_DIRTY = "corruption-without-dirty"  # dirty bit clear on disk, yet check finds corruption
    READONLY_OPEN_CHANGED = "readonly-open-changed"  # a read-only open wrote to the image or repaired it
    UNOPENABLE = "unopenable"  # a crash image could not be opened at all
    REPAIR_FAILED = "repair-failed"  # repair raised or reported failure
    NOT_CLEAN_AFTER_REPAIR = "not-clean-after-repair"  # check after recovery: corruptions, leaks, errors, dirty bit
    REPAIR_CHANGED_DATA = "repair-changed-data"  # guest view after repair differs from the read-only view before
    REPAIR_NOT_IDEMPOTENT = "repair-not-idempotent"  # a crash during repair, then repair again, gives other data or an unclean image
    CHECK_FAILED = "check-failed"  # explicit check of a live image found problems
    QEMU_DISAGREES = "qemu-disagrees"  # real qemu-img check gave another verdict on the same image
    UNEXPECTED_EXCEPTION = "unexpected-exception"  # an exception that is not a qcow2 error
    # I/O errors as faults (harness.errorpoints, harness.errorsweep): a failed host operation at an error point.
    ERROR_SWALLOWED = "error-swallowed"  # a guest call during which a host operation failed reported success
    ERROR_LOST_DATA = "error-lost-data"  # data acknowledged before the failed call was lost
    ERROR_CORRUPTION = "error-corruption"  # after the error: clean dirty bit yet corruption, or the next open fails
    ERROR_REPAIR_STUCK = "error-repair-stuck"  # a repair met an error and the next repair cannot finish
    SNAPSHOT_CHANGED = "snapshot-changed"  # a snapshot reads differently than when taken, or the set is neither before nor after
    SNAPSHOT_HALF_DONE = "snapshot-half-done"  # a crash left a snapshot apply half done within one L1 sector's span


@dataclasses.dataclass(slots=True)
class Finding:
    verdict: Verdict
    rule: str  # the contract sentence that broke
    evidence: str
    op_index: int  # the operation at which the divergence appeared
    phase: str  # run | raw | recovery | recovery-crash | continue
    crash_id: str | None = None
    policy: str | None = None
    sector: int | None = None
    op_kind: str = "?"  # the type of the operation at which it appeared

    def signature(self) -> str:
        """Dedup key: verdict + the kind of operation at which it appeared + the crash policy + the phase."""
        return f"{self.verdict}@{self.op_kind}/{self.policy or '-'}/{self.phase}"

    def short_signature(self) -> str:
        return hashlib.sha1(self.signature().encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return serial.to_data(self)  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, data: dict, where: str = "finding") -> "Finding":
        return serial.from_data(cls, data, where=where)

    def __str__(self) -> str:
        where = f" [{self.crash_id}]" if self.crash_id else ""
        return f"{self.verdict} at op #{self.op_index} ({self.phase}){where}: {self.evidence}"


RULES = {
    Verdict.DATA_LOST: "every guest sector reads its durable value or a value written to it since",
    Verdict.FOREIGN_DATA: "never data written to another sector or by another operation",
    Verdict.GARBAGE: "never garbage",
    Verdict.READ_MISMATCH: "without a crash, reads return what was written",
    Verdict.CORRUPTION_WITHOUT_DIRTY: "dirty bit clear on disk: check finds 0 corruptions",
    Verdict.READONLY_OPEN_CHANGED: "a read-only open reads without repairing and leaves the bit set",
    Verdict.UNOPENABLE: "after a crash the image opens",
    Verdict.REPAIR_FAILED: "repair always restores consistent refcounts",
    Verdict.NOT_CLEAN_AFTER_REPAIR: "after repair: 0 corruptions, 0 leaks, 0 check errors, dirty bit clear",
    Verdict.REPAIR_CHANGED_DATA: "repair never changes the guest view",
    Verdict.REPAIR_NOT_IDEMPOTENT: "a crash during repair leaves an image the next repair fixes, with the same guest data",
    Verdict.CHECK_FAILED: "a live image checks clean",
    Verdict.QEMU_DISAGREES: "qemu-img check agrees with qcrash's verdict",
    Verdict.UNEXPECTED_EXCEPTION: "no unexpected exception",
    Verdict.ERROR_SWALLOWED: "a guest call that meets a host I/O error returns an error",
    Verdict.ERROR_LOST_DATA: "data acknowledged before a failed guest call is not lost",
    Verdict.ERROR_CORRUPTION: "after a host I/O error the image is consistent for the next open: leaks allowed, "
                              "no corruption",
    Verdict.ERROR_REPAIR_STUCK: "a repair that meets an error leaves an image the next repair completes",
    Verdict.SNAPSHOT_CHANGED: "a snapshot operation in flight is done or not done; every snapshot reads as when it was taken",
    Verdict.SNAPSHOT_HALF_DONE: "a snapshot apply in flight is done or not done, never half",
}


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
