"""Snapshot operations in the differential runner: issuing SnapshotCreate/Apply/Delete to the model and the image, and judging what a crash left of them.

Kept out of runner.py so the runner only dispatches and calls the judge:

- an operation the model refuses (apply or delete of a name it does not hold, create of a
  name it holds) is a no-op on both sides; so is one the image refuses before writing
  (a refcount that would overflow with refcount_bits 1 or 2), counted in coverage;
- after a crash (recovered image): the snapshot names are the set before the operation in
  flight or the set after it; every snapshot present reads exactly as when it was taken;
  an apply in flight is not half done within the guest span of one L1 sector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.oracle import Verdict
from harness.ops import SnapshotApply, SnapshotCreate, SnapshotDelete
from models.blockio import MemoryFile
from models.qcow2 import snapshot
from models.qcow2.image import Qcow2Image

if TYPE_CHECKING:
    from harness.crashstates import CrashState
    from harness.oracle import Finding
    from harness.runner import Runner
    from models.refdisk import ReferenceDisk

SECTOR = 512


def dispatch(runner: "Runner", n: int, op: SnapshotCreate | SnapshotApply | SnapshotDelete) -> None:
    """Issue one snapshot operation as a guest-level op (swept like the others), or skip it as refused."""
    img, model, name = runner.image, runner.model, op.name
    held = name in model.snapshot_names()
    if isinstance(op, SnapshotCreate):
        if held or _refused(runner, lambda: snapshot.check_room(img, img.l1, "snapshot create")):
            return
        runner._guest(n, lambda m: m.begin_snapshot_create(n, name),
                      lambda: _count(runner, snapshot.create(img, name, date_sec=n)))
    elif not held:
        runner.stats.coverage["snapshot op on a missing name skipped"] += 1
    elif isinstance(op, SnapshotApply):
        if _refused(runner, lambda: snapshot.check_room(img, snapshot.snapshot_l1(img, name), "snapshot apply")):
            return
        runner._guest(n, lambda m: m.begin_snapshot_apply(n, name), lambda: _count(runner, snapshot.apply(img, name)))
    else:
        runner._guest(n, lambda m: m.begin_snapshot_delete(n, name),
                      lambda: _count(runner, snapshot.delete(img, name=name)))


def _refused(runner: "Runner", probe) -> bool:
    try:
        probe()
    except snapshot.SnapshotRefused:
        runner.stats.coverage["snapshot refused (refcount would overflow)"] += 1
        return True
    return False


def _count(runner: "Runner", _result: object) -> None:
    img = runner.image
    if any(img.refcount(c) > 1 for c in _data_clusters(img)):
        runner.stats.coverage["refcount above 1 reached"] += 1


def _data_clusters(img: Qcow2Image) -> list[int]:
    out = []
    for guest in img.allocated_guest_clusters():
        _entry, _ctype, host = img._lookup(guest)
        out.append(img.geo.offset_to_cluster(host))
    return out


def names_in(raw: bytes) -> frozenset[str]:
    """The snapshot names of an image (bytes), opened read-only."""
    img = Qcow2Image.open(MemoryFile(raw), readonly=True)
    return frozenset(sn.name for sn in snapshot.list_snapshots(img))


def judge(runner: "Runner", raw_recovered: bytes, pre: dict[int, bytes], model: "ReferenceDisk", n: int,
          state: "CrashState") -> "Finding | None":
    """The snapshot rules on a recovered crash image; None when there is nothing to judge or all hold."""
    outcomes = model.snapshot_outcomes()
    if outcomes == [frozenset()] and not model.snapshot_names():
        return None
    img = Qcow2Image.open(MemoryFile(raw_recovered), readonly=True)
    found = frozenset(sn.name for sn in snapshot.list_snapshots(img))
    if found not in outcomes:
        return runner._finding(Verdict.SNAPSHOT_CHANGED, f"snapshots {sorted(found)} after the crash; allowed: "
                               + " or ".join(str(sorted(o)) for o in outcomes), n, "recovery", state)
    sectors = sorted(model.touched_sectors())
    for name in sorted(found):
        bad = model.snapshot_mismatch(name, lambda off, length, key=name: snapshot.read(img, key, off, length), sectors)
        if bad:
            return runner._finding(Verdict.SNAPSHOT_CHANGED, bad, n, "recovery", state)
    cs = img.geo.cluster_size
    half = model.half_applied(lambda off, length: pre.get(off // SECTOR, bytes(SECTOR)), 64 * (cs // 8) * cs)
    if half:
        return runner._finding(Verdict.SNAPSHOT_HALF_DONE, half, n, "raw", state)
    return None


def judge_final(runner: "Runner", img: Qcow2Image, n: int) -> "Finding | None":
    """After a clean close: the image holds exactly the model's snapshots, each reading as taken."""
    found = sorted(sn.name for sn in snapshot.list_snapshots(img))
    if found != runner.model.snapshot_names():
        return runner._finding(Verdict.SNAPSHOT_CHANGED, f"snapshots {found} after a clean close; the model holds "
                               f"{runner.model.snapshot_names()}", n, "finish")
    sectors = sorted(runner.model.touched_sectors())
    for name in found:
        bad = runner.model.snapshot_mismatch(name, lambda off, length, key=name: snapshot.read(img, key, off, length),
                                             sectors)
        if bad:
            return runner._finding(Verdict.SNAPSHOT_CHANGED, bad, n, "finish")
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


def crash_coverage(runner: "Runner", point: int) -> None:
    """Coverage of crashes inside snapshot work: the op the crash point falls in, when snapshots share clusters."""
    from harness.faultfile import OpKind
    from harness.ops import Discard, Write, WriteZeroes
    from models.blockio import WriteSite

    span = next((s for s in runner.spans if s.start < point <= s.end), None)
    if span is None or span.op_index >= len(runner.ops):
        return
    op = runner.ops[span.op_index]
    if isinstance(op, (SnapshotCreate, SnapshotApply, SnapshotDelete)):
        runner.stats.coverage[f"crashed inside a snapshot {type(op).__name__[8:].lower()}"] += 1
    elif isinstance(op, (Write, WriteZeroes, Discard)) and span.model_before.snapshot_names():
        runner.stats.coverage["crashed inside a write while snapshots share clusters"] += 1
        sites = {o.site for o in runner.ff.log.ops[span.start:point] if o.kind is OpKind.WRITE}
        if WriteSite.L2_ALLOC in sites:
            runner.stats.coverage["crashed inside an L2 allocation while snapshots share clusters (copy-on-write)"] += 1
