"""Broken snapshot tables as QEMU 7.2 treats them: what the open refuses, what the check counts, what the overlap guard protects."""

from __future__ import annotations

import struct

import pytest

from models.blockio import MemoryFile
from models.qcow2 import check as checkmod
from models.qcow2 import snapshot
from models.qcow2.errors import InvalidImage, MetadataOverlap
from models.qcow2.image import Qcow2Image
from models.qcow2.snaptable import Snapshot, read_table

CS = 4096
MiB = 1 << 20
NB = 60  # header: nb_snapshots (4 bytes), then snapshots_offset (8)


def with_snapshot() -> tuple[bytearray, Snapshot, int]:
    """An image with one snapshot and a private (COPIED) L2 table: (bytes, the snapshot, the table's offset)."""
    f = MemoryFile(name="t.qcow2")
    Qcow2Image.create(f, 4 * MiB, cluster_size=CS)
    img = Qcow2Image.open(f)
    img.write(0, b"\x11" * CS)
    snapshot.create(img, "one")
    img.write(0, b"\x22" * CS)  # copy-on-write: the active L2 table and data cluster are private again
    img.close()
    raw = bytearray(f.getvalue())
    nb, offset = struct.unpack_from(">IQ", raw, NB)
    assert nb == 1
    return raw, snapshot.list_snapshots(Qcow2Image.open(MemoryFile(bytes(raw)), readonly=True))[0], offset


def entry_field(raw: bytearray, table: int, first: int, code: str, value: int) -> None:
    struct.pack_into(">" + code, raw, table + first, value)


def test_v3_entry_without_disk_size_opens_and_check_counts_it() -> None:
    raw, _sn, table = with_snapshot()
    entry_field(raw, table, 36, "I", 8)  # extra_data_size 8 < 16: the id and name now start 16 bytes early
    f = MemoryFile(bytes(raw), name="t.qcow2")
    assert len(snapshot.list_snapshots(Qcow2Image.open(f, readonly=True))) == 1  # QEMU's open accepts it
    result = checkmod.check(f)
    assert "ERROR snapshot table entry 0 is incomplete" in result.messages
    assert result.corruptions == 1 and result.check_errors == 0


def test_unaligned_snapshot_l1_is_a_check_corruption_and_refused_on_use() -> None:
    raw, sn, table = with_snapshot()
    entry_field(raw, table, 0, "Q", sn.l1_table_offset + 8)
    f = MemoryFile(bytes(raw), name="t.qcow2")
    result = checkmod.check(f)
    assert (f"ERROR snapshot 1 (one) l1_offset={sn.l1_table_offset + 8:#x}: L1 table is not cluster aligned; "
            "snapshot table entry corrupted") in result.messages
    assert result.corruptions >= 1 and result.error is None
    img = Qcow2Image.open(f)
    for use in (lambda: snapshot.apply(img, "one"), lambda: snapshot.delete(img, name="one"),
                lambda: snapshot.read(img, "one", 0, 512)):
        with pytest.raises(InvalidImage, match="Snapshot L1 table offset invalid"):
            use()


def test_more_than_65536_snapshots_stop_the_check_with_qemu_words() -> None:
    raw, _sn, _table = with_snapshot()
    struct.pack_into(">I", raw, NB, 65537)
    result = checkmod.check(MemoryFile(bytes(raw), name="t.qcow2"))
    assert result.messages[:2] == ["qemu-img: ERROR snapshot table too large",
                                   "You can force-remove all 1 overhanging snapshots with qemu-img check -r all"]
    assert result.check_errors == 1 and result.error == "File too large"
    with pytest.raises(InvalidImage, match="Snapshot table too large"):
        Qcow2Image.open(MemoryFile(bytes(raw), name="t.qcow2"), readonly=True)


def test_too_much_extra_data_refuses_the_open_and_is_a_check_error() -> None:
    raw, _sn, table = with_snapshot()
    entry_field(raw, table, 36, "I", 1025)
    with pytest.raises(InvalidImage, match="Too much extra metadata in snapshot table entry 0"):
        Qcow2Image.open(MemoryFile(bytes(raw), name="t.qcow2"), readonly=True)
    result = checkmod.check(MemoryFile(bytes(raw), name="t.qcow2"))
    assert result.messages[:2] == [
        "qemu-img: ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry 0",
        "You can force-remove this extra metadata with qemu-img check -r all"]
    assert result.check_errors == 1 and result.error == "File too large"


def test_repair_cuts_what_qemu_cuts_but_does_not_claim_success() -> None:
    raw, _sn, table = with_snapshot()
    entry_field(raw, table, 36, "I", 1025)
    f = MemoryFile(bytes(raw), name="t.qcow2")
    result = checkmod.repair(f, checkmod.Fix.ALL)
    assert "Discarding too much extra metadata in snapshot table entry 0 (1025 > 1024)" in result.messages
    assert not result.consistent_after_fix  # QEMU rewrites the table; qcrash's repair does not


def test_read_table_is_one_pass_over_a_huge_zero_table() -> None:
    # 65536 entries past the end of a small file: zeros, 40 bytes each, as QEMU reads them.
    snapshots, size = read_table(MemoryFile(bytes(CS)), 65536, CS, disk_size=MiB)
    assert len(snapshots) == 65536 and size == 65536 * 40
    assert snapshots[0] == Snapshot("", "", 0, 0, MiB, vm_state_size=0, icount=-1)


@pytest.mark.parametrize("aim", ["snapshot table", "inactive L1 table"])
def test_write_aimed_at_snapshot_metadata_is_refused_and_marks_corrupt(aim: str) -> None:
    raw, sn, table = with_snapshot()
    f = MemoryFile(bytes(raw), name="t.qcow2")
    img = Qcow2Image.open(f, readonly=True)
    l2 = img.l1[0] & 0x00FFFFFFFFFFFE00
    target = table if aim == "snapshot table" else sn.l1_table_offset
    struct.pack_into(">Q", raw, l2, target | (1 << 63))  # guest cluster 0 now lands on the metadata, in place
    f = MemoryFile(bytes(raw), name="t.qcow2")
    log: list[str] = []
    img = Qcow2Image.open(f, log=log.append)
    with pytest.raises(MetadataOverlap, match=f"overlaps with {aim}"):
        img.write(0, b"\x33" * 512)
    assert log == [f"qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with {aim}); "
                   "further corruption events will be suppressed"]
    assert f.getvalue()[target:target + 512] == bytes(raw[target:target + 512])  # untouched
    assert struct.unpack_from(">Q", f.getvalue(), 72)[0] & 2  # the corrupt bit
