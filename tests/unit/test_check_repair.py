"""Unit tests for models.qcow2.check on hand-made images: clean images, leaks, refcount and COPIED errors, rebuilds, write order of a repair, and the dirty bit."""

from __future__ import annotations

import struct

import pytest

from models.blockio import MemoryFile, WriteSite
from models.qcow2.check import (
    Fix,
    Kind,
    check,
    clear_dirty_bit,
    exit_code,
    format_human,
    format_json,
    mark_clean_if_repaired,
    repair,
)
from models.qcow2.structs import Header
from tests.guestview import guest_view
from tests.unit._check_tools import COPIED, build, incompat


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("cluster_bits", [9, 12, 16, 21])
def test_clean_built_image(version: int, cluster_bits: int) -> None:
    img = build(version=version, cluster_bits=cluster_bits, guest={0: 0x5A, 3: 0x11})
    result = check(img.file())
    assert result.messages == []
    assert exit_code(result) == 0 and result.is_clean
    assert result.allocated_clusters == 2
    assert result.total_clusters == (64 << 20) // img.cs
    assert result.image_end_offset == len(img.data)
    assert result.fragmented_clusters == 0


@pytest.mark.parametrize("order", range(7))
def test_clean_built_image_every_refcount_width(order: int) -> None:
    img = build(cluster_bits=9, refcount_order=order, guest={0: 1, 1: 2, 70: 3})
    result = check(img.file())
    assert (result.messages, exit_code(result)) == ([], 0)


def test_leak_found_and_fixed_with_fix_leaks() -> None:
    img = build(guest={0: 0x5A})
    img.put64(img.l2_entry_offset(0), 0)  # the data cluster is now referenced by nothing
    data_cluster = img.data_offsets[0] // img.cs
    result = check(img.file())
    assert result.messages == [f"Leaked cluster {data_cluster} refcount=1 reference=0"]
    assert (result.leaks, result.corruptions, exit_code(result)) == (1, 0, 3)
    f = img.file()
    fixed = check(f, Fix.LEAKS)
    assert fixed.messages == [
        f"Leaked cluster {data_cluster} refcount=1 reference=0",
        f"Repairing cluster {data_cluster} refcount=1 reference=0",
    ]
    assert (fixed.leaks_fixed, fixed.leaks, exit_code(fixed)) == (1, 0, 0)
    assert fixed.double_checked and fixed.repaired_any
    assert fixed.image_end_offset == data_cluster * img.cs  # the leaked cluster was the last one
    # the freed cluster was discarded (qemu-img punches a hole; we write zeros)
    assert f.getvalue()[img.data_offsets[0] : img.data_offsets[0] + img.cs] == bytes(img.cs)
    assert check(f).is_clean


def test_refcount_zero_needs_rebuild_and_fix_leaks_refuses() -> None:
    img = build(guest={0: 0x5A}, lazy=True, dirty=True)
    data_cluster = img.data_offsets[0] // img.cs
    img.set_refcount(data_cluster, 0)
    result = check(img.file())
    assert result.messages == [
        f"ERROR cluster {data_cluster} refcount=0 reference=1",
        f"ERROR OFLAG_COPIED data cluster: l2_entry={img.data_offsets[0] | COPIED:x} refcount=0",
    ]
    assert (result.corruptions, exit_code(result)) == (2, 2)
    f = img.file()
    before = f.getvalue()
    leaks_only = repair(f, Fix.LEAKS)
    assert leaks_only.messages[-1] == "ERROR need to rebuild refcount structures"
    assert leaks_only.error == "Input/output error" and leaks_only.check_errors == 1
    assert exit_code(leaks_only) == 1
    assert f.getvalue() == before  # nothing written, dirty bit kept
    assert format_json(leaks_only, "x") == ""
    out, err = format_human(leaks_only, "x", True)
    assert out == "" and err.endswith("ERROR need to rebuild refcount structures\nqemu-img: Check failed: Input/output error\n")


def test_rebuild_repairs_zero_refcount_and_keeps_guest_data() -> None:
    img = build(guest={0: 0x5A, 9: 0x6B}, lazy=True, dirty=True)
    view = guest_view(img.data)
    for g in img.data_offsets:
        img.set_refcount(img.data_offsets[g] // img.cs, 0)
    f = img.file()
    result = repair(f, Fix.ALL)
    assert "Rebuilding refcount structure" in result.messages
    assert result.rebuilt and exit_code(result) == 0
    assert result.corruptions_fixed == 2
    assert incompat(f.getvalue()) == 0
    assert guest_view(f.getvalue()) == view
    after = check(f)
    assert after.messages == [] and after.is_clean


def test_refcount_too_low_fixed_in_place() -> None:
    img = build(guest={0: 0x5A})
    # a second L2 entry sharing the data cluster: reference 2, refcount 1
    img.put64(img.l2_entry_offset(1), img.data_offsets[0] | COPIED)
    data_cluster = img.data_offsets[0] // img.cs
    l2e = f"{img.data_offsets[0] | COPIED:x}"
    result = check(img.file())
    assert result.messages == [
        f"ERROR cluster {data_cluster} refcount=1 reference=2",
    ]
    assert exit_code(result) == 2
    f = img.file()
    fixed = repair(f, Fix.ALL)
    assert fixed.messages[:4] == [
        f"ERROR cluster {data_cluster} refcount=1 reference=2",
        f"Repairing cluster {data_cluster} refcount=1 reference=2",
        f"Repairing OFLAG_COPIED data cluster: l2_entry={l2e} refcount=2",
        f"Repairing OFLAG_COPIED data cluster: l2_entry={l2e} refcount=2",
    ]
    assert (fixed.corruptions_fixed, exit_code(fixed)) == (3, 0)
    assert check(f).is_clean


def test_copied_flag_wrong() -> None:
    img = build(guest={0: 0x5A})
    l2 = img.l2_offsets[0]
    img.put64(img.l1_offset, l2)  # COPIED cleared on the L1 entry
    entry = img.data_offsets[0]
    img.put64(img.l2_entry_offset(0), entry)  # and on the L2 entry
    result = check(img.file())
    assert result.messages == [
        f"ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry={l2:x} refcount=1",
        f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount=1",
    ]
    assert [f.kind for f in result.findings] == [Kind.COPIED_L2, Kind.COPIED_DATA]
    f = img.file()
    fixed = repair(f, Fix.LEAKS)  # repaired with LEAKS alone since nothing else is wrong
    assert (fixed.corruptions_fixed, exit_code(fixed)) == (2, 0)
    assert struct.unpack_from(">Q", f.getvalue(), img.l1_offset)[0] == l2 | COPIED
    assert struct.unpack_from(">Q", f.getvalue(), img.l2_entry_offset(0))[0] == entry | COPIED


def test_reserved_bits_and_unaligned_entries() -> None:
    img = build(cluster_bits=16, guest={0: 0x5A})
    img.put64(img.l1_offset, img.u64(img.l1_offset) | (1 << 56))
    entry = img.u64(img.l2_entry_offset(0))
    img.put64(img.l2_entry_offset(0), entry | 2)
    result = check(img.file())
    assert result.messages == [
        f"ERROR found L1 entry with reserved bits set: {img.u64(img.l1_offset):x}",
        f"ERROR found l2 entry with reserved bits set: {entry | 2:x}",
    ]
    assert exit_code(result) == 2
    # an unaligned preallocated (zero flag) entry is turned into ZERO_PLAIN by Fix.ERRORS
    img2 = build(cluster_bits=16, guest={0: 0x5A})
    img2.put64(img2.l2_entry_offset(0), img2.data_offsets[0] | 0x201 | COPIED)
    f = img2.file()
    fixed = repair(f, Fix.ALL)
    assert fixed.messages[0] == f"Repairing offset={img2.data_offsets[0] | 0x200:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
    assert struct.unpack_from(">Q", f.getvalue(), img2.l2_entry_offset(0))[0] == 1
    assert exit_code(fixed) == 0


def test_refblock_refcount_not_one_and_reftable_entry_past_eof() -> None:
    img = build(guest={0: 0x5A})
    # reftable entry 1 pointing at the L2 table: that refblock is counted twice
    img.put64(img.reftable_offset + 8, img.l2_offsets[0])
    result = check(img.file())
    assert "ERROR refcount block 1 refcount=2" in result.messages
    assert exit_code(result) == 2
    f = img.file()
    assert exit_code(repair(f, Fix.ALL)) == 0 and check(f).is_clean

    img = build(guest={0: 0x5A})
    img.put64(img.reftable_offset + 8, 0x1000000)
    result = check(img.file())
    assert result.messages == ["ERROR refcount block 1 is outside image"]
    f = img.file()
    fixed = repair(f, Fix.ALL)
    assert fixed.messages[0] == "Repairing refcount block 1 is outside image"
    assert exit_code(fixed) == 0 and f.size() >= 0x1000000 + img.cs


def test_reference_past_eof() -> None:
    img = build(guest={0: 0x5A})
    img.put64(img.l2_entry_offset(1), 0x100000 | COPIED)
    result = check(img.file())
    assert result.messages == [
        "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x100000 size 0x10000",
        "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000100000 refcount=0",
    ]
    assert (result.corruptions, result.allocated_clusters, result.fragmented_clusters) == (2, 2, 1)


def test_rebuild_grows_refcount_table_512_byte_clusters() -> None:
    # 64-bit refcounts in 512-byte clusters: 64 clusters per refblock, 64 refblocks per reftable cluster
    guest = {g: (g % 251) + 1 for g in range(0, 9000)}
    img = build(cluster_bits=9, refcount_order=6, size=8 << 20, guest=guest, lazy=True, dirty=True)
    view = guest_view(img.data)
    assert img.reftable_clusters >= 3
    # lose the whole refcount table
    img.data[img.reftable_offset : img.reftable_offset + img.reftable_clusters * img.cs] = bytes(img.reftable_clusters * img.cs)
    f = img.file()
    result = repair(f, Fix.ALL)
    assert result.rebuilt and exit_code(result) == 0
    hdr = Header.unpack(f.getvalue()[:112])
    assert hdr.refcount_table_clusters >= 3
    assert incompat(f.getvalue()) == 0
    assert guest_view(f.getvalue()) == view
    assert check(f).messages == []


def test_rebuild_loop_when_reftable_needs_another_refblock() -> None:
    # Sizes around a full reftable cluster exercise the "reftable grew again" iteration.
    for n in range(4020, 4100, 7):
        img = build(cluster_bits=9, refcount_order=6, size=4 << 20, guest={g: 1 for g in range(n)})
        img.set_refcount(img.data_offsets[0] // img.cs, 0)
        f = img.file()
        result = repair(f, Fix.ALL)
        assert exit_code(result) == 0, (n, result.messages[-3:])
        assert check(f).messages == []


def test_repair_writes_new_structures_before_switching_the_header() -> None:
    img = build(guest={0: 0x5A}, lazy=True, dirty=True)
    img.set_refcount(img.data_offsets[0] // img.cs, 0)
    trace: list[str] = []

    class Recorder(MemoryFile):
        def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
            trace.append(str(site))
            super().pwrite(offset, data, site)

        def flush(self) -> None:
            trace.append("F")

    repair(Recorder(bytes(img.data)), Fix.ALL)
    switch = trace.index(str(WriteSite.REFTABLE_SWITCH))
    assert trace[switch - 1] == "F" and trace[switch + 1] == "F"
    assert set(trace[:switch - 1]) == {str(WriteSite.REPAIR)}
    assert trace[-2:] == [str(WriteSite.DIRTY_BIT), "F"]


def test_dirty_bit_rules() -> None:
    img = build(guest={0: 0x5A}, lazy=True, dirty=True)
    f = img.file()
    result = check(f)  # a clean but dirty image: check never touches the bit
    assert result.is_clean and incompat(f.getvalue()) == 1
    assert not mark_clean_if_repaired(f, result)  # no fix requested
    result = check(f, Fix.ALL)
    assert result.consistent_after_fix and incompat(f.getvalue()) == 1
    assert mark_clean_if_repaired(f, result) and incompat(f.getvalue()) == 0
    # the corrupt bit is cleared too (qcow2_mark_consistent)
    f.pwrite(72, (3).to_bytes(8, "big"))
    assert clear_dirty_bit(f) and incompat(f.getvalue()) == 0
    assert not clear_dirty_bit(f)
    # v2 has no feature bits
    assert not clear_dirty_bit(build(version=2).file())


def test_first_pass_is_the_repairing_run() -> None:
    img = build(guest={0: 0x5A}, lazy=True, dirty=True)
    img.set_refcount(img.data_offsets[0] // img.cs, 0)
    result = repair(img.file(), Fix.ALL)
    assert result.double_checked and result.first_pass is not None
    first = result.first_pass
    assert first.first_pass is None and not first.double_checked
    assert (first.corruptions_fixed, first.corruptions, first.check_errors) == (result.corruptions_fixed, 0, 0)
    assert first.messages == result.messages  # the re-check of a clean image prints nothing
    assert first.allocated_clusters == 2 * result.allocated_clusters  # QEMU counts them again after a rebuild
