"""Unit tests for models.qcow2.check: images built by hand (always) and by qemu-img/qemu-io (when installed)."""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.blockio import MemoryFile, OsFile, WriteSite
from models.qcow2 import spec
from models.qcow2.check import (
    CheckResult,
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
from models.qcow2.errors import InvalidImage, Qcow2Error, UnsupportedFeature
from models.qcow2.geometry import set_refcount
from models.qcow2.structs import Header
from tests.guestview import guest_view

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


def needs_qemu(test):
    """Mark a test as QEMU-dependent and skip it cleanly without qemu-img/qemu-io."""
    skip = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed (Debian package qemu-utils)")
    return pytest.mark.qemu(skip(test))


COPIED = 1 << 63


# ------------------------------------------------------------------------------------------
# A hand-made image builder (no QEMU needed): header, reftable, refblocks, L1, L2s, data.


@dataclasses.dataclass
class Built:
    data: bytearray
    cluster_bits: int
    refcount_order: int
    reftable_offset: int
    reftable_clusters: int
    refblock_offsets: list[int]
    l1_offset: int
    l2_offsets: dict[int, int]  # l1 index -> L2 offset
    data_offsets: dict[int, int]  # guest cluster -> host offset

    @property
    def cs(self) -> int:
        return 1 << self.cluster_bits

    def u64(self, offset: int) -> int:
        return struct.unpack_from(">Q", self.data, offset)[0]

    def put64(self, offset: int, value: int) -> None:
        struct.pack_into(">Q", self.data, offset, value)

    def l2_entry_offset(self, guest_cluster: int) -> int:
        l2e = self.cs // 8
        return self.l2_offsets[guest_cluster // l2e] + (guest_cluster % l2e) * 8

    def set_refcount(self, cluster: int, value: int) -> None:
        per = self.cs * 8 >> self.refcount_order
        block = self.refblock_offsets[cluster // per]
        raw = bytearray(self.data[block : block + self.cs])
        set_refcount(raw, cluster % per, self.refcount_order, value)
        self.data[block : block + self.cs] = raw

    def file(self) -> MemoryFile:
        return MemoryFile(bytes(self.data), name="built.qcow2")


def build(
    *,
    cluster_bits: int = 16,
    refcount_order: int = 4,
    version: int = 3,
    size: int = 64 << 20,
    guest: dict[int, int] | None = None,
    lazy: bool = False,
    dirty: bool = False,
) -> Built:
    """A consistent image; `guest` maps guest cluster -> fill byte of its data cluster."""
    guest = guest or {}
    cs = 1 << cluster_bits
    l2e = cs // 8
    per_block = cs * 8 >> refcount_order
    l1_size = max(1, -(-size // (cs * l2e)))
    l1_clusters = -(-l1_size * 8 // cs)
    l2_indices = sorted({g // l2e for g in guest})
    fixed = 1 + l1_clusters + len(l2_indices) + len(guest)
    nrt, nrb = 1, 1
    while nrb * per_block < fixed + nrt + nrb or nrt * cs // 8 < nrb:
        if nrt * cs // 8 < nrb:
            nrt += 1
        else:
            nrb += 1
    total = fixed + nrt + nrb
    buf = bytearray(total * cs)
    reftable_offset = cs
    refblocks = [(1 + nrt + i) * cs for i in range(nrb)]
    l1_offset = (1 + nrt + nrb) * cs
    next_cluster = 1 + nrt + nrb + l1_clusters
    l2_offsets = {}
    for index in l2_indices:
        l2_offsets[index] = next_cluster * cs
        next_cluster += 1
    data_offsets = {}
    for g in sorted(guest):
        data_offsets[g] = next_cluster * cs
        buf[next_cluster * cs : (next_cluster + 1) * cs] = bytes([guest[g]]) * cs
        next_cluster += 1
    assert next_cluster == total
    hdr = Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=reftable_offset,
        refcount_table_clusters=nrt,
        incompatible_features=int(spec.IncompatFeature.DIRTY) if dirty else 0,
        compatible_features=int(spec.CompatFeature.LAZY_REFCOUNTS) if lazy else 0,
        refcount_order=refcount_order if version >= 3 else 4,
        header_length=spec.V3_HEADER_LENGTH if version >= 3 else spec.V2_HEADER_LENGTH,
    )
    raw = hdr.pack()
    buf[: len(raw)] = raw
    for i, off in enumerate(refblocks):
        struct.pack_into(">Q", buf, reftable_offset + 8 * i, off)
    for index, off in l2_offsets.items():
        struct.pack_into(">Q", buf, l1_offset + 8 * index, off | COPIED)
    for g, off in data_offsets.items():
        l2 = l2_offsets[g // l2e]
        struct.pack_into(">Q", buf, l2 + 8 * (g % l2e), off | COPIED)
    built = Built(buf, cluster_bits, hdr.refcount_order, reftable_offset, nrt, refblocks, l1_offset, l2_offsets, data_offsets)
    for cluster in range(total):
        built.set_refcount(cluster, 1)
    return built


def incompat(buf: bytes) -> int:
    return struct.unpack_from(">Q", buf, 72)[0]


# ------------------------------------------------------------------------------------------
# Hand-made images


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


def test_exit_codes_and_human_output() -> None:
    r = CheckResult(total_clusters=2048, allocated_clusters=1, image_end_offset=393216, corruptions=2)
    assert exit_code(r) == 2
    out, err = format_human(r, "t.qcow2", False)
    assert out == (
        "\n2 errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n"
        "1/2048 = 0.05% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
        "Image end offset: 393216\n"
    )
    assert err == ""
    assert exit_code(CheckResult(leaks=1)) == 3
    assert exit_code(CheckResult(leaks=1, check_errors=1)) == 1
    assert exit_code(CheckResult(error="Input/output error")) == 1
    assert exit_code(CheckResult(leaks_fixed=4)) == 0
    out, err = format_human(CheckResult(check_errors=2, image_end_offset=512), "x", False)
    assert out == "\n2 internal errors have occurred during the check.\nImage end offset: 512\n"
    assert err == "qemu-img: Check failed\n"


def test_json_key_order_and_omitted_fields() -> None:
    r = CheckResult(
        image_end_offset=1, total_clusters=2, corruptions=3, leaks=4, corruptions_fixed=5, leaks_fixed=6,
        allocated_clusters=7, fragmented_clusters=8, compressed_clusters=9,
    )
    text = format_json(r, 'a"b\\/é\t\U0001f600')
    assert text == (
        "{\n"
        '    "image-end-offset": 1,\n'
        '    "compressed-clusters": 9,\n'
        '    "total-clusters": 2,\n'
        '    "corruptions": 3,\n'
        '    "corruptions-fixed": 5,\n'
        '    "check-errors": 0,\n'
        '    "leaks": 4,\n'
        '    "leaks-fixed": 6,\n'
        '    "allocated-clusters": 7,\n'
        '    "filename": "a\\"b\\\\/\\u00E9\\t\\uD83D\\uDE00",\n'
        '    "format": "qcow2",\n'
        '    "fragmented-clusters": 8\n'
        "}\n"
    )
    assert format_json(CheckResult(), "f") == '{\n    "check-errors": 0,\n    "filename": "f",\n    "format": "qcow2"\n}\n'


# ------------------------------------------------------------------------------------------
# Robustness: garbage gives findings or a clear InvalidImage, never a crash or a hang


@pytest.mark.parametrize(
    "patch, field",
    [
        ({0: b"XXXX"}, "magic"),
        ({4: (4).to_bytes(4, "big")}, "version"),
        ({20: (30).to_bytes(4, "big")}, "cluster_bits"),
        ({96: (7).to_bytes(4, "big")}, "refcount_order"),
        # One header parser (read_header) for open and check: it names the table's offset
        # field for a table too large (tests/property/test_header_mutation.py pins the text).
        ({36: (0xFFFFFFFF).to_bytes(4, "big")}, "l1_table_offset"),
        ({36: (0).to_bytes(4, "big")}, "l1_size"),  # L1 table is too small
        ({40: (0x10001).to_bytes(8, "big")}, "l1_table_offset"),
        ({56: (0x1000).to_bytes(4, "big")}, "refcount_table_offset"),
        ({48: (0x123).to_bytes(8, "big")}, "refcount_table_offset"),
        ({100: (50).to_bytes(4, "big")}, "header_length"),
        ({8: (0x20000).to_bytes(8, "big")}, "backing_file_offset"),
    ],
)
def test_bad_headers_raise_invalid_image(patch: dict[int, bytes], field: str) -> None:
    img = build(guest={0: 1})
    for offset, raw in patch.items():
        img.data[offset : offset + len(raw)] = raw
    with pytest.raises(InvalidImage) as info:
        check(MemoryFile(bytes(img.data), name="bad.qcow2"))
    assert info.value.field == field
    assert "bad.qcow2" in str(info.value) and info.value.rule


def test_unsupported_features_and_empty_files() -> None:
    img = build()
    img.put64(72, 1 << 4)  # extended L2
    with pytest.raises(UnsupportedFeature):
        check(img.file())
    for size in (0, 3, 50):
        with pytest.raises(InvalidImage):
            check(MemoryFile(bytes(build().data[:size])))


def test_truncated_file_reports_corruptions() -> None:
    img = build(guest={0: 1, 1: 2})
    f = MemoryFile(bytes(img.data[: img.l1_offset + 8]))  # L2 table and data cut away
    result = check(f)
    assert result.corruptions >= 1 and exit_code(result) == 2
    assert any(k.kind == Kind.PAST_EOF for k in result.findings)


def test_huge_l1_all_pointing_at_one_table_is_bounded() -> None:
    # 4 Mi L1 entries (32 MiB, QEMU's maximum) all pointing at the header cluster
    cs = 512
    l1_size = spec.QCOW_MAX_L1_SIZE // 8
    hdr = Header(cluster_bits=9, size=1 << 20, l1_size=l1_size, l1_table_offset=4 * cs,
                 refcount_table_offset=cs, refcount_table_clusters=1)
    buf = bytearray(4 * cs)
    buf[:112] = hdr.pack()
    buf[4 * cs :] = struct.pack(">Q", COPIED | 0x200) * 200000  # past the end the table reads as zeros
    buf[0x200:0x208] = (2 * cs).to_bytes(8, "big")
    try:
        result = check(MemoryFile(bytes(buf)))
    except InvalidImage as exc:
        assert exc.field == "l1_table"
    else:
        assert exit_code(result) == 2


def _mutations() -> st.SearchStrategy:
    return st.lists(
        st.tuples(st.integers(0, 12 * 512 - 1), st.integers(0, 255), st.booleans()),
        min_size=1,
        max_size=6,
    )


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(mutations=_mutations(), cut=st.one_of(st.none(), st.integers(0, 12 * 512)), order=st.integers(0, 6))
def test_garbage_never_crashes_and_successful_repair_is_clean(mutations, cut, order) -> None:
    img = build(cluster_bits=9, refcount_order=order, size=1 << 20, guest={0: 1, 1: 2, 64: 3}, lazy=True)
    data = bytearray(img.data)
    for pos, value, xor in mutations:
        if pos < len(data):
            data[pos] = data[pos] ^ value if xor else value
    if cut is not None:
        del data[cut:]
    try:
        first = check(MemoryFile(bytes(data)))
    except Qcow2Error:
        return
    assert exit_code(first) in (0, 1, 2, 3)
    f = MemoryFile(bytes(data))
    result = repair(f, Fix.ALL)
    if exit_code(result) == 0:
        again = check(f)
        assert again.is_clean, again.messages
        assert incompat(f.getvalue()) & 3 == 0 or Header.unpack(f.getvalue()[:112].ljust(112, b"\0")).version == 2


# ------------------------------------------------------------------------------------------
# Images made by QEMU


def qemu(*args: str, check_rc: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check_rc)


def qemu_image(path: Path, opts: str, size: str, *io_cmds: str, crash: bool = False) -> Path:
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), size)
    cmds = [arg for c in io_cmds for arg in ("-c", c)]
    if crash:
        cmds += ["-c", "sigraise 9"]
    if cmds:
        qemu("qemu-io", "-t", "writethrough", *cmds, str(path), check_rc=not crash)
    return path


def check_path(path: Path, fix: Fix = Fix.NONE, *, do_repair: bool = False) -> CheckResult:
    f = OsFile(path)
    try:
        return (repair if do_repair else check)(f, fix, path=str(path))
    finally:
        f.close()


@pytest.mark.parametrize(
    "opts",
    [
        "compat=0.10",
        "compat=0.10,cluster_size=512",
        "compat=1.1",
        "compat=1.1,cluster_size=512",
        "compat=1.1,cluster_size=4096",
        "compat=1.1,cluster_size=2M",
    ]
    + [f"compat=1.1,refcount_bits={bits}" for bits in (1, 2, 4, 8, 16, 32, 64)],
)
@pytest.mark.parametrize("write", [False, True])
@needs_qemu
def test_fresh_qemu_images_are_clean(tmp_path: Path, opts: str, write: bool) -> None:
    img = qemu_image(tmp_path / "a.qcow2", opts, "128M", *(["write -P 0x5a 0 512"] if write else []))
    result = check_path(img)
    assert result.messages == [] and exit_code(result) == 0
    cs = 512 if "cluster_size=512" in opts else 4096 if "4096" in opts else (2 << 20) if "2M" in opts else 65536
    assert result.total_clusters == (128 << 20) // cs
    assert result.allocated_clusters == (1 if write else 0)


@needs_qemu
def test_iotest_039_dirty_image(tmp_path: Path) -> None:
    img = qemu_image(tmp_path / "t.qcow2", "compat=1.1,lazy_refcounts=on", "128M", "write -P 0x5a 0 512", crash=True)
    assert incompat(img.read_bytes()) == 1
    result = check_path(img)
    assert result.messages == [
        "ERROR cluster 5 refcount=0 reference=1",
        "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0",
    ]
    assert (result.corruptions, result.leaks, result.check_errors, exit_code(result)) == (2, 0, 0, 2)
    out, err = format_human(result, str(img), False)
    assert out == (
        "\n2 errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n"
        "1/2048 = 0.05% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
        "Image end offset: 393216\n"
    )
    fixed = check_path(img, Fix.ALL, do_repair=True)
    assert fixed.messages == [
        "ERROR cluster 5 refcount=0 reference=1",
        "Rebuilding refcount structure",
        "Repairing cluster 1 refcount=1 reference=0",
        "Repairing cluster 2 refcount=1 reference=0",
    ]
    out, _err = format_human(fixed, str(img), True)
    assert out == (
        "The following inconsistencies were found and repaired:\n\n"
        "    0 leaked clusters\n    1 corruptions\n\n"
        "Double checking the fixed image now...\n"
        "No errors were found on the image.\n"
        "1/2048 = 0.05% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
        "Image end offset: 524288\n"
    )
    assert exit_code(fixed) == 0 and fixed.corruptions_fixed == 1
    data = img.read_bytes()
    assert incompat(data) == 0
    assert struct.unpack_from(">Q", data, 48)[0] == 0x70000  # QEMU's placement: refblock 0x60000, reftable 0x70000
    assert qemu("qemu-io", "-r", "-c", "read -P 0x5a 0 512", str(img), check_rc=False).returncode == 0


@needs_qemu
def test_qemu_leak_by_zeroed_l2_entry(tmp_path: Path) -> None:
    img = qemu_image(tmp_path / "l.qcow2", "compat=1.1", "128M", "write -P 0x5a 0 512")
    with open(img, "r+b") as fh:
        fh.seek(0x40000)
        fh.write(bytes(8))
    result = check_path(img)
    assert (result.messages, exit_code(result), result.image_end_offset) == (
        ["Leaked cluster 5 refcount=1 reference=0"], 3, 393216)
    fixed = check_path(img, Fix.LEAKS, do_repair=True)
    assert (fixed.leaks_fixed, exit_code(fixed), fixed.image_end_offset) == (1, 0, 327680)
    assert check_path(img).is_clean


@needs_qemu
def test_qemu_lazy_crash_rebuild_grows_reftable(tmp_path: Path) -> None:
    img = qemu_image(
        tmp_path / "g.qcow2", "compat=1.1,lazy_refcounts=on,cluster_size=512,refcount_bits=64", "16M",
        "write -P 0x11 0 3M", "write -P 0x22 8M 1M", crash=True,
    )
    raw_before = qemu("qemu-img", "convert", "-O", "raw", str(img), str(tmp_path / "before.raw"))
    assert raw_before.returncode == 0
    first = check_path(img)
    assert exit_code(first) == 2 and first.corruptions >= 1
    fixed = check_path(img, Fix.ALL, do_repair=True)
    assert fixed.rebuilt and exit_code(fixed) == 0
    hdr = Header.unpack(img.read_bytes()[:112])
    assert hdr.refcount_table_clusters > 1  # more than the one cluster qemu-img create made
    assert check_path(img).messages == []
    qemu("qemu-img", "convert", "-O", "raw", str(img), str(tmp_path / "after.raw"))
    assert (tmp_path / "before.raw").read_bytes() == (tmp_path / "after.raw").read_bytes()


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
