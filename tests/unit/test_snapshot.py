"""Internal snapshots without QEMU: the table format, create/apply/delete on the image, refcounts and COPIED, the model's rules, and the runner."""

from __future__ import annotations

import pytest

from harness.config import Config
from harness.ops import Crash, Flush, OpError, SnapshotApply, SnapshotCreate, SnapshotDelete, Write, validate_op
from harness.runner import Runner
from models.blockio import MemoryFile
from models.qcow2 import check as checkmod
from models.qcow2 import snapshot, spec
from models.qcow2.image import Qcow2Image
from models.qcow2.snaptable import ENTRY_FIELDS, EXTRA_FIELDS, Snapshot, read_table, table_bytes
from models.refdisk import ReferenceDisk
from models.refsnap import SnapshotError

CS = 4096
MiB = 1 << 20


def fresh(cluster_size: int = CS, refcount_bits: int = 16, version: int = 3, lazy: bool = False) -> tuple[MemoryFile, Qcow2Image]:
    f = MemoryFile(name="t.qcow2")
    Qcow2Image.create(f, 4 * MiB, cluster_size=cluster_size, refcount_bits=refcount_bits, version=version,
                      lazy_refcounts=lazy)
    return f, Qcow2Image.open(f)


def clean(f: MemoryFile) -> checkmod.CheckResult:
    return checkmod.check(f)


def data_entry(img: Qcow2Image, guest: int) -> int:
    return img._lookup(guest)[0]


# ---- the table ---------------------------------------------------------------------------
def test_table_fields_cover_their_byte_ranges_in_order() -> None:
    fields = ENTRY_FIELDS + EXTRA_FIELDS
    assert fields[0][2] == 0 and fields[-1][3] == 63
    for (_, _, _, last), (_, _, first, _) in zip(fields, fields[1:]):
        assert first == last + 1


def test_table_round_trip_and_alignment() -> None:
    sns = [Snapshot("1", "first", 0x7000, 2, 4 * MiB, date_sec=5, date_nsec=6, vm_clock_nsec=7),
           Snapshot("2", "a-longer-name", 0x9000, 2, 4 * MiB, unknown_extra=b"\x01" * 8)]
    raw = table_bytes(sns)
    first = sns[0].pack()
    assert len(first) == 40 + 24 + 1 + 5
    assert raw[len(first):len(first) + (-len(first) % 8)] == bytes(-len(first) % 8)  # next entry 8-aligned
    f = MemoryFile(bytes(0x10000) + raw)
    back, size = read_table(f, 2, 0x10000, disk_size=4 * MiB)
    assert back == sns and size == len(raw)


def test_v3_entry_without_disk_size_is_read_with_the_image_size() -> None:
    # QEMU's open accepts it (the check counts it: tests/unit/test_snapshot_hostile.py).
    raw = bytearray(Snapshot("1", "x", 0x7000, 1, 2 * MiB).pack())
    raw[36:40] = (8).to_bytes(4, "big")  # extra_data_size 8 < 16: id and name start at byte 48 now
    raw[48:50] = b"1x"
    back, size = read_table(MemoryFile(bytes(raw[:50])), 1, 0, disk_size=MiB)
    assert (back[0].id_str, back[0].name, back[0].disk_size, size) == ("1", "x", MiB, 50)


# ---- the image ----------------------------------------------------------------------------
def test_create_shares_clusters_and_clears_copied() -> None:
    f, img = fresh()
    img.write(0, b"\x11" * 8192)
    l2_before = img.l1[0]
    assert l2_before & spec.QCOW_OFLAG_COPIED
    sn = snapshot.create(img, "one")
    assert (sn.id_str, sn.name, sn.l1_size, sn.disk_size) == ("1", "one", len(img.l1), 4 * MiB)
    l2 = img.l1[0] & spec.L1E_OFFSET_MASK
    assert not img.l1[0] & spec.QCOW_OFLAG_COPIED and img.refcount(l2 // CS) == 2
    host = data_entry(img, 0) & spec.L2E_OFFSET_MASK
    assert not data_entry(img, 0) & spec.QCOW_OFLAG_COPIED and img.refcount(host // CS) == 2
    img.close()
    assert clean(f).is_clean


def test_write_after_create_copies_the_l2_table_and_the_cluster() -> None:
    f, img = fresh()
    img.write(0, b"\x11" * 8192)
    snapshot.create(img, "one")
    old_l2 = img.l1[0] & spec.L1E_OFFSET_MASK
    img.write(512, b"\x22" * 512)
    assert img.l1[0] & spec.L1E_OFFSET_MASK != old_l2 and img.l1[0] & spec.QCOW_OFLAG_COPIED
    assert data_entry(img, 0) & spec.QCOW_OFLAG_COPIED  # the copy is private
    assert snapshot.read(img, "one", 0, 8192) == b"\x11" * 8192
    assert img.read(0, 1024) == b"\x11" * 512 + b"\x22" * 512
    img.close()
    assert clean(f).is_clean


def test_discard_and_write_zeroes_never_change_a_snapshot() -> None:
    f, img = fresh()
    img.write(0, b"\x33" * 3 * CS)
    snapshot.create(img, "one")
    img.discard(0, CS)
    img.write_zeroes(CS, CS)
    assert img.read(0, 2 * CS) == bytes(2 * CS)
    assert snapshot.read(img, "one", 0, 3 * CS) == b"\x33" * 3 * CS
    img.close()
    assert clean(f).is_clean


def test_apply_restores_and_delete_restores_copied() -> None:
    f, img = fresh()
    img.write(0, b"\x44" * CS)
    snapshot.create(img, "one")
    img.write(0, b"\x55" * CS)
    snapshot.apply(img, "one")
    assert img.read(0, CS) == b"\x44" * CS
    snapshot.delete(img, name="one")
    assert snapshot.list_snapshots(img) == []
    assert img.l1[0] & spec.QCOW_OFLAG_COPIED and data_entry(img, 0) & spec.QCOW_OFLAG_COPIED
    img.close()
    result = clean(f)
    assert result.is_clean, result.messages
    assert Qcow2Image.open(f, readonly=True).hdr.snapshots_offset == 0  # an empty table: offset 0, as QEMU


def test_apply_by_id_and_missing_names() -> None:
    _f, img = fresh()
    snapshot.create(img, "one")
    snapshot.create(img, "one")  # names may repeat, ids may not
    assert [s.id_str for s in snapshot.list_snapshots(img)] == ["1", "2"]
    assert snapshot.apply(img, "2").id_str == "2"
    with pytest.raises(snapshot.SnapshotNotFound):
        snapshot.apply(img, "nope")
    with pytest.raises(snapshot.SnapshotNotFound):
        snapshot.delete(img, name="nope")


def test_refcount_overflow_is_refused_before_any_write() -> None:
    f, img = fresh(refcount_bits=1)
    img.write(0, b"\x66" * CS)
    img.flush()
    before = f.getvalue()
    with pytest.raises(snapshot.SnapshotRefused, match="refcount"):
        snapshot.create(img, "one")
    assert f.getvalue() == before


def test_check_counts_snapshot_references_and_finds_a_missing_one() -> None:
    f, img = fresh()
    img.write(0, b"\x77" * CS)
    snapshot.create(img, "one")
    img.close()
    assert clean(f).is_clean
    # Point the snapshot's L1 entry away: the shared L2 table is now over-counted (a leak).
    sn = snapshot.list_snapshots(Qcow2Image.open(f, readonly=True))[0]
    f.pwrite(sn.l1_table_offset, bytes(8))
    result = clean(f)
    assert result.leaks and not result.corruptions


# ---- the model --------------------------------------------------------------------------------
def test_model_snapshot_rules() -> None:
    m = ReferenceDisk(MiB, "writeback")
    m.write(0, b"\x01" * 512, op_index=0)
    m.begin_snapshot_create(1, "a")
    assert m.snapshot_outcomes() == [frozenset(), frozenset({"a"})]
    m.complete(1)
    assert m.snapshot_names() == ["a"] and m.snapshot_outcomes() == [frozenset({"a"})]
    m.write(0, b"\x02" * 512, op_index=2)
    m.begin_snapshot_apply(3, "a")
    half_ok = {0: b"\x01" * 512}
    assert m.half_applied(lambda off, n: half_ok.get(off // 512, bytes(n)), 1 << 20) is None
    m.complete(3)
    assert m.read(0, 512) == b"\x01" * 512
    m.begin_snapshot_delete(4, "a")
    assert m.snapshot_outcomes() == [frozenset({"a"}), frozenset()]
    m.complete(4)
    assert m.snapshot_names() == [] and m.read(0, 512) == b"\x01" * 512
    with pytest.raises(SnapshotError):
        m.begin_snapshot_apply(5, "a")


def test_model_detects_a_half_applied_span() -> None:
    m = ReferenceDisk(MiB, "writethrough")
    m.write(0, b"\x01" * 512, op_index=0)
    m.write(512, b"\x01" * 512, op_index=1)
    m.begin_snapshot_create(2, "a")
    m.complete(2)
    m.write(0, b"\x02" * 1024, op_index=3)
    m.begin_snapshot_apply(4, "a")
    mixed = {0: b"\x01" * 512, 1: b"\x02" * 512}  # sector 0 applied, sector 1 not
    assert "half done" in m.half_applied(lambda off, n: mixed[off // 512], 1 << 20)
    assert m.half_applied(lambda off, n: mixed[off // 512], 512) is None  # different spans: allowed


def test_snapshot_op_names_are_validated() -> None:
    with pytest.raises(OpError, match="non-numeric"):
        validate_op(SnapshotCreate("7"), Config())


# ---- the runner ------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    Config(cluster_size=4096, lazy_refcounts=False),
    Config(cluster_size=512, lazy_refcounts=True, cache_mode="writeback"),
    Config(version=2, cluster_size=65536, lazy_refcounts=False),
])
def test_runner_sweeps_snapshot_ops_without_findings(config: Config) -> None:
    ops = [Write(0, 8192, 1), Write(MiB, 4096, 2), SnapshotCreate("a"), Write(0, 512, 3), SnapshotCreate("b"),
           Write(2 * MiB, 4096, 4), SnapshotApply("a"), Write(4096, 4096, 5), Crash(-3, "subsets", 3),
           SnapshotDelete("b"), Flush(), SnapshotDelete("zz"), SnapshotApply("a")]
    runner = Runner(config, seed=3)
    assert runner.run(ops) == []
    assert runner.stats.coverage["refcount above 1 reached"] >= 1
    assert runner.stats.by_site["snapshot-header"] >= 1 and runner.stats.crash_states > 20


def _every_entry(table) -> list[tuple[int, int]]:
    """What update_refcounts visited before it skipped zero entries: every entry, in order."""
    return [(j, int.from_bytes(table[8 * j:8 * j + 8], "big")) for j in range(len(table) // 8)]


def _snapshot_story(cluster_size: int, lazy: bool) -> tuple[bytes, list]:
    from harness.faultfile import FaultInjectingFile

    size = max(4 * MiB, 8 * cluster_size)
    mem = MemoryFile(name="t.qcow2")
    Qcow2Image.create(mem, size, cluster_size=cluster_size, lazy_refcounts=lazy)
    f = FaultInjectingFile(mem)
    img = Qcow2Image.open(f)
    for k, at in enumerate((0, 3 * cluster_size, size // 4, size - 2048)):
        img.write(at, bytes([k + 1]) * 1536)
    img.write_zeroes(size // 2, 2 * cluster_size)  # (zero-flag entries, with and without a cluster)
    img.discard(3 * cluster_size, cluster_size)
    snapshot.create(img, "one")
    img.write(0, b"\x77" * 512)
    snapshot.create(img, "two")
    snapshot.apply(img, "one")
    snapshot.delete(img, name="two")
    img.close()
    return mem.getvalue(), [(op.kind, op.offset, op.data, op.site) for op in f.log]


@pytest.mark.parametrize("cluster_size, lazy", [(512, False), (4096, True), (65536, False), (1 << 21, True)])
def test_update_refcounts_skipping_zero_entries_writes_what_visiting_all_did(cluster_size, lazy, monkeypatch) -> None:
    # update_refcounts visits only the non-zero L2 entries (a zero entry changes nothing); with every
    # entry visited instead (the full path), the same story ends in the same bytes after the same writes.
    fast = _snapshot_story(cluster_size, lazy)
    monkeypatch.setattr(snapshot, "nonzero_u64_items", _every_entry)
    full = _snapshot_story(cluster_size, lazy)
    assert fast == full
    assert checkmod.check(MemoryFile(fast[0])).is_clean
