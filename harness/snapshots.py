"""The snapshot rules of the crash contract: judging what a crash or a clean close left of internal snapshots, and their coverage.

Kept out of the runner and the judge so they only call in here (CRASH-CONTRACT.md, Snapshots):

- after a crash (recovered image): the snapshot names are the set before the operation in
  flight or the set after it; every snapshot present reads exactly as when it was taken;
  an apply in flight is not half done within the guest span of one L1 sector;
- after a clean close: the image holds exactly the model's snapshots, each reading as taken;
- a crash inside a snapshot operation may leave COPIED out of step only where
  `check -r leaks` repairs it completely (`benign_copied`, python checker results).

Snapshot operations themselves are Target methods (`snapshot_create/apply/delete`), issued
by the executor like every other guest operation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.oracle import Verdict

if TYPE_CHECKING:
    from harness.judge import AcceptedViews, Where
    from harness.oracle import Finding
    from collections.abc import Callable

    from harness.targets import SnapshotReader, Target
    from models.qcow2.image import Qcow2Image
    from models.refdisk import ReferenceDisk

SECTOR = 512

# Coverage the runner counts per snapshot operation (not per crash state: no judge counts them).
OP_COVERAGE = ("refcount above 1 reached", "snapshot op on a missing name skipped",
               "snapshot refused (refcount would overflow)")
# Coverage of crashes inside snapshot work (crash_coverage below); reports list these and OP_COVERAGE.
CRASH_COVERAGE = ("crashed inside a snapshot create", "crashed inside a snapshot apply",
                  "crashed inside a snapshot delete", "crashed inside a write while snapshots share clusters",
                  "crashed inside an L2 allocation while snapshots share clusters (copy-on-write)")


def model_refuses(op, model: "ReferenceDisk") -> str | None:
    """Whether the model refuses a snapshot op, which is then a no-op on both sides.

    None: it runs. Otherwise a coverage label ("" for a create of a name held already, not counted).
    """
    from harness.ops import SnapshotCreate

    held = op.name in model.snapshot_names()
    if isinstance(op, SnapshotCreate):
        return "" if held else None
    return None if held else "snapshot op on a missing name skipped"


def judge(target: "Target", where: "Where", raw_recovered: bytes, pre: dict[int, bytes],
          model: "ReferenceDisk", reader_of: "Callable[[], SnapshotReader] | None" = None,
          accepted: "AcceptedViews | None" = None) -> "Finding | None":
    """The snapshot rules on a recovered crash image; None when there is nothing to judge or all hold.

    `reader_of` gives the image's snapshot reader (the judge's memoised one); by default
    `target.snapshots(raw_recovered)`. `accepted` (the judge's, for one sweep over an
    unchanging model) remembers the snapshot views the model found matching.
    """
    outcomes = model.snapshot_outcomes()
    if outcomes == [frozenset()] and not model.snapshot_names():
        return None
    reader = reader_of() if reader_of is not None else target.snapshots(raw_recovered)
    found = frozenset(reader.names)
    if found not in outcomes:
        return where.finding(Verdict.SNAPSHOT_CHANGED, f"snapshots {sorted(found)} after the crash; allowed: "
                             + " or ".join(str(sorted(o)) for o in outcomes), "recovery")
    sectors = sorted(model.touched_sectors())
    for name in sorted(found):
        bad = _mismatch(reader, name, model, sectors, accepted)
        if bad:
            return where.finding(Verdict.SNAPSHOT_CHANGED, bad, "recovery")
    cs = reader.cluster_size
    half = model.half_applied(lambda off, length: pre.get(off // SECTOR, bytes(SECTOR)), 64 * (cs // 8) * cs)
    if half:
        return where.finding(Verdict.SNAPSHOT_HALF_DONE, half, "raw")
    return None


def _mismatch(reader: "SnapshotReader", name: str, model: "ReferenceDisk", sectors: list[int],
              accepted: "AcceptedViews | None" = None) -> str | None:
    """The model's snapshot_mismatch for one snapshot, its sectors read in runs when the reader offers it.

    `snapshot_mismatch` reads exactly the touched sectors and the snapshot's own, one at a
    time; they are read up front in runs and compared as a view. Should that read fail,
    the reads go one by one, so an error (or a mismatch before it) surfaces exactly where
    the one-by-one path finds it.
    """
    def one(off: int, length: int) -> bytes:
        return reader.read(name, off, length)

    if reader.read_many is not None:
        try:
            got = reader.read_many(name, sorted(set(sectors) | set(model.snapshot_view(name))))
        except Exception:  # noqa: BLE001 - replayed one by one below
            got = None
        if got is not None:
            if accepted is not None and accepted.holds(name, got):
                return None  # (this model found this very view matching: `accepted`)
            found = model.snapshot_mismatch_view(name, got, sectors)
            if found == "" and accepted is not None:
                accepted.add(name, got)
            if found is not None:
                return found or None
    return model.snapshot_mismatch(name, one, sectors)


def judge_final(target: "Target", where: "Where", raw: bytes, model: "ReferenceDisk") -> "Finding | None":
    """After a clean close: the image holds exactly the model's snapshots, each reading as taken."""
    from harness.targets import TargetError

    try:
        reader = target.snapshots(raw)
    except TargetError:
        if model.snapshot_names():
            raise
        return None  # a target without snapshot support, and none to compare
    found = sorted(reader.names)
    if found != model.snapshot_names():
        return where.finding(Verdict.SNAPSHOT_CHANGED, f"snapshots {found} after a clean close; the model holds "
                             f"{model.snapshot_names()}", "finish")
    sectors = sorted(model.touched_sectors())
    for name in found:
        bad = _mismatch(reader, name, model, sectors)
        if bad:
            return where.finding(Verdict.SNAPSHOT_CHANGED, bad, "finish")
    return None


def benign_copied(result) -> bool:
    """Whether every corruption a check found is a COPIED flag out of step in the harmless direction.

    QEMU writes a snapshot operation's L2 tables (COPIED flags) and refcount blocks in
    separate, ordered writes, so a crash between them leaves, with the dirty bit clear,
    either COPIED clear on a cluster whose refcount is 1 (costs one needless copy) or COPIED
    set on a cluster whose refcount is above 1 only because of a leaked reference (its one
    real reference may write in place). Both are repaired by `check -r leaks`. COPIED set
    on a cluster with two real references is never benign: a write would change a snapshot.
    """
    from models.qcow2.check import Kind

    if result.check_errors:
        return False
    leaked_to_one = {f.cluster for f in result.findings if f.kind is Kind.LEAK and f.reference == 1}
    copied = [f for f in result.findings if f.kind in (Kind.COPIED_DATA, Kind.COPIED_L2)]
    if len(copied) != result.corruptions:
        return False
    for f in copied:
        entry = f.args[-2]
        if entry >> 63 and not (f.refcount > 1 and f.cluster in leaked_to_one):
            return False
        if not entry >> 63 and f.refcount != 1:
            return False
    return True


def shared_data_events(img: "Qcow2Image") -> tuple[str, ...]:
    """Coverage after a snapshot operation on the live image: whether some data cluster is shared now."""
    # All lookups first, then the refcounts (the order of cache loads is part of the behaviour digests).
    clusters = [img.geo.offset_to_cluster(img._lookup(guest)[2]) for guest in img.allocated_guest_clusters()]
    return ("refcount above 1 reached",) if any(img.refcount(c) > 1 for c in clusters) else ()


def crash_coverage(op_kind: str, model: "ReferenceDisk", sites: "set | frozenset") -> list[str]:
    """Coverage labels of a crash inside an op of kind `op_kind` (the guest op in flight, judged with `model`).

    Called only when snapshots exist or one is in flight; `sites` are the write sites of the
    op's host writes up to the crash point.
    """
    from models.blockio import WriteSite

    if op_kind in ("SnapshotCreate", "SnapshotApply", "SnapshotDelete"):
        return [f"crashed inside a snapshot {op_kind[8:].lower()}"]
    out = []
    if op_kind in ("Write", "WriteZeroes", "Discard") and model.snapshot_names():
        out.append("crashed inside a write while snapshots share clusters")
        if WriteSite.L2_ALLOC in sites:
            out.append("crashed inside an L2 allocation while snapshots share clusters (copy-on-write)")
    return out
