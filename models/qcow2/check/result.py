"""What a check reports: the fix mode, the printed lines as data, the counters, and qemu-img's exit status."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["Fix", "Kind", "Finding", "Lines", "CheckCounts", "CheckResult", "exit_code", "FIX_LEAKS", "FIX_ERRORS"]

# The fix bits as plain ints: the checker's inner loops test these (IntFlag arithmetic there
# cost seconds per nightly example).
FIX_LEAKS = 1
FIX_ERRORS = 2


class Fix(enum.IntFlag):
    """What a check may repair (QEMU's BdrvCheckMode: BDRV_FIX_LEAKS, BDRV_FIX_ERRORS)."""

    NONE = 0
    LEAKS = FIX_LEAKS
    ERRORS = FIX_ERRORS
    ALL = LEAKS | ERRORS


class Kind(enum.StrEnum):
    """What a printed check line is about."""

    REFCOUNT_ERROR = "refcount-error"  # ERROR cluster N refcount=R reference=r (R < r)
    LEAK = "leak"  # Leaked cluster N refcount=R reference=r
    REPAIRED = "repaired"  # Repairing cluster N refcount=R reference=r
    REFCOUNT_IO = "refcount-io"  # Can't get refcount for cluster N: ...
    COPIED_DATA = "copied-data"  # OFLAG_COPIED data cluster
    COPIED_L2 = "copied-l2"  # OFLAG_COPIED L2 cluster
    L1_RESERVED = "l1-reserved"
    L2_UNALIGNED = "l2-unaligned"
    L2_RESERVED = "l2-reserved"
    DATA_UNALIGNED = "data-unaligned"
    PREALLOC_UNALIGNED = "prealloc-unaligned"
    COMPRESSED_COPIED = "compressed-copied"
    PAST_EOF = "past-eof"
    EXTENDED = "extended"  # qcrash only: file grown over clusters referenced past its end
    OVERFLOW = "overflow"
    REFTABLE_RESERVED = "reftable-reserved"
    REFBLOCK_UNALIGNED = "refblock-unaligned"
    REFBLOCK_OUTSIDE = "refblock-outside"
    RESIZE_FAILED = "resize-failed"
    REFBLOCK_REFCOUNT = "refblock-refcount"
    REBUILD = "rebuild"  # Rebuilding refcount structure
    NEED_REBUILD = "need-rebuild"  # ERROR need to rebuild refcount structures
    REBUILD_BROKEN = "rebuild-broken"
    REBUILD_FAILED = "rebuild-failed"
    CORRUPTION_SIGNAL = "corruption-signal"  # qcow2: Marking image as corrupt / Image is corrupt
    WRITE_FAILED = "write-failed"
    SNAPSHOT_L1 = "snapshot-l1"  # ERROR snapshot ID (NAME) l1_offset=/l1_size=: snapshot table entry corrupted
    SNAPSHOT_TABLE = "snapshot-table"  # the check's reading of the snapshot table (models/qcow2/snapcheck.py)


class Finding:
    """One line QEMU prints on stderr during the check, kept as data: its kind, the numbers it carries, and a template.

    The text is formatted only when someone reads `message` (a dirty-image repair on a
    512-byte-cluster image can produce a million of these lines that nobody prints).
    """

    __slots__ = ("kind", "cluster", "refcount", "reference", "template", "args")

    def __init__(self, kind: Kind, cluster: int | None = None, refcount: int | None = None,
                 reference: int | None = None, template: str = "", args: tuple = ()) -> None:
        self.kind = kind
        self.cluster = cluster  # host cluster index, where the line names one
        self.refcount = refcount  # the on-disk refcount it printed
        self.reference = reference  # the computed number of references it printed
        self.template = template  # str.format template of the line (the line itself when args is empty)
        self.args = args

    @property
    def message(self) -> str:
        """The line exactly as QEMU prints it (without the newline)."""
        return self.template.format(*self.args) if self.args else self.template

    def _key(self) -> tuple:
        return (self.kind, self.cluster, self.refcount, self.reference, self.message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Finding) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Finding(kind={self.kind!r}, cluster={self.cluster!r}, refcount={self.refcount!r}, "
                f"reference={self.reference!r}, message={self.message!r})")


def _line(item: "str | Finding") -> str:
    return item if type(item) is str else item.message  # type: ignore[union-attr]


class Lines(Sequence[str]):
    """Printed lines, each a str or a Finding formatted only when read; equal to the tuple of their texts.

    A dirty 512-byte-cluster repair prints a thousand lines per crash state and the judge
    reads at most four of them (`CheckSummary.text()`): formatting them all was a tenth of
    a nightly example. The items are shared, never copied or mutated.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable["str | Finding"] = ()) -> None:
        self._items = tuple(items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return tuple(map(_line, self._items[index]))
        return _line(self._items[index])

    def __iter__(self) -> Iterator[str]:
        return map(_line, self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Lines, tuple, list)):
            return len(self) == len(other) and tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Lines({tuple(self)!r})"


@dataclasses.dataclass(slots=True)
class CheckCounts:
    """The counters qemu-img check reports (QEMU's BdrvCheckResult / ImageCheck numbers)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def copy(self) -> "CheckCounts":
        return CheckCounts(*(getattr(self, f.name) for f in dataclasses.fields(CheckCounts)))


@dataclasses.dataclass(slots=True)
class CheckResult(CheckCounts):
    """What qemu-img check reports (ImageCheck), plus the printed lines and how the repair went.

    After a repair that fixed anything, the counts are those of the read-only re-check
    ("Double checking the fixed image now..."), with corruptions_fixed/leaks_fixed carried
    over from the repairing run, exactly as qemu-img reports them.
    """

    findings: list[Finding] = dataclasses.field(default_factory=list)
    rebuilt: bool = False
    fix: Fix = Fix.NONE
    # strerror text when the check itself failed (qemu-img: "Check failed: <error>", exit 1,
    # no summary printed); None when it completed.
    error: str | None = None
    # True when the re-check after a repair ran ("Double checking the fixed image now...").
    double_checked: bool = False
    # QEMU's mark-clean rule evaluated on the repairing run: fix requested, the check completed,
    # 0 corruptions and 0 check errors left. Only then may the dirty and corrupt bits be cleared.
    consistent_after_fix: bool = False
    # After a double check: the repairing run's own result (what QEMU's open-time repair of a
    # dirty image sees: it fails with "Could not repair dirty image" when that run failed or
    # had check errors). None when no double check ran (then this result is that run).
    first_pass: "CheckResult | None" = None

    @classmethod
    def from_counts(cls, counts: CheckCounts, findings: list[Finding], fix: Fix) -> "CheckResult":
        values = {f.name: getattr(counts, f.name) for f in dataclasses.fields(CheckCounts)}
        return cls(**values, findings=findings, fix=fix)

    @property
    def messages(self) -> list[str]:
        """The stderr lines of the check, in QEMU's order (without qemu-img's own "Check failed")."""
        return [f.message for f in self.findings]

    @property
    def lines(self) -> Lines:
        """`messages`, formatted only when read."""
        return Lines(self.findings)

    @property
    def repaired_any(self) -> bool:
        return bool(self.corruptions_fixed or self.leaks_fixed)

    @property
    def is_clean(self) -> bool:
        """qemu-img would exit 0."""
        return exit_code(self) == 0


def exit_code(result: CheckResult) -> int:
    """qemu-img check's exit status: 0 clean (or clean after repair), 1 check failed, 2 corruptions, 3 leaks only."""
    if result.error is not None or result.check_errors:
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0
