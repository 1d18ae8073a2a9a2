"""Robustness of models.qcow2.check: garbage gives findings or a clear InvalidImage, never a crash or a hang."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.blockio import MemoryFile
from models.qcow2 import spec
from models.qcow2.check import Fix, Kind, check, exit_code, repair
from models.qcow2.errors import InvalidImage, Qcow2Error, UnsupportedFeature
from models.qcow2.structs import Header
from tests.unit._check_tools import COPIED, build, incompat


@pytest.mark.parametrize(
    "patch, field",
    [
        ({0: b"XXXX"}, "magic"),
        ({4: (4).to_bytes(4, "big")}, "version"),
        ({20: (30).to_bytes(4, "big")}, "cluster_bits"),
        ({96: (7).to_bytes(4, "big")}, "refcount_order"),
        # One header parser (read_header) for open and check: it names the table's offset
        # field for a table too large (tests/property/test_header_rules.py pins the text).
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
