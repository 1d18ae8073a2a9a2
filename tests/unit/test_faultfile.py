"""Tests for harness.faultfile: pass-through, recording, the WriteLog's epoch helpers, sector pieces."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.blockio import SECTOR
from harness.faultfile import FaultInjectingFile, HostOp, HostOpKind, WriteLog, sector_count, sector_pieces
from models.blockio import BlockFile, MemoryFile, OsFile, WriteSite


def scripted() -> FaultInjectingFile:
    """ops: 0 write, 1 write, 2 flush, 3 write (grows), 4 truncate, 5 flush, 6 write."""
    f = FaultInjectingFile(MemoryFile(b"o" * 1024, name="disk.qcow2"))
    f.pwrite(0, b"a" * 512, WriteSite.HEADER)
    f.pwrite(512, b"b" * 512, WriteSite.L1)
    f.flush()
    f.pwrite(1024, b"c" * 1024, WriteSite.L2_ALLOC)
    f.truncate(1536)
    f.flush()
    f.pwrite(0, b"d" * 100, WriteSite.DATA)
    return f


def test_is_a_block_file_and_passes_everything_through():
    inner = MemoryFile(b"o" * 1024, name="disk.qcow2")
    f = FaultInjectingFile(inner)
    assert isinstance(f, BlockFile)
    assert f.name == "disk.qcow2"
    f.pwrite(1000, b"xyz" * 10, WriteSite.DATA)
    assert inner.getvalue() == b"o" * 1000 + b"xyz" * 10
    assert f.pread(998, 5) == b"ooxyz"
    assert f.size() == inner.size() == 1030
    f.truncate(500)
    assert inner.getvalue() == b"o" * 500
    assert f.size() == 500


def test_records_every_op_with_its_size_after():
    f = scripted()
    log = f.log
    assert [op.kind for op in log] == [HostOpKind.WRITE, HostOpKind.WRITE, HostOpKind.FLUSH, HostOpKind.WRITE, HostOpKind.TRUNCATE, HostOpKind.FLUSH, HostOpKind.WRITE]
    assert [op.index for op in log] == list(range(7))
    assert [op.size_after for op in log] == [1024, 1024, 1024, 2048, 1536, 1536, 1536]
    assert log[3] == HostOp(3, HostOpKind.WRITE, 1024, b"c" * 1024, WriteSite.L2_ALLOC, 2048)
    assert log[4] == HostOp(4, HostOpKind.TRUNCATE, 1536, b"", WriteSite.OTHER, 1536)
    assert log.base == b"o" * 1024 and log.base_size == 1024
    assert f.point() == len(log) == 7
    # (Recorded ops are built slot by slot, not through __init__: still the same frozen, hashable values.)
    assert hash(log[3]) == hash(HostOp(3, HostOpKind.WRITE, 1024, b"c" * 1024, WriteSite.L2_ALLOC, 2048))
    with pytest.raises(dataclasses.FrozenInstanceError):
        log[3].offset = 0  # type: ignore[misc]


def test_bytes_are_kept_by_reference_and_mutable_buffers_copied():
    f = FaultInjectingFile(MemoryFile())
    data = b"z" * 4096
    f.pwrite(0, data)
    assert f.log[0].data is data
    buf = bytearray(b"q" * 8)
    f.pwrite(0, buf)
    view_source = bytearray(b"v" * 8)
    f.pwrite(8, memoryview(view_source))
    buf[:] = b"!" * 8
    view_source[:] = b"!" * 8
    assert f.log[1].data == b"q" * 8 and type(f.log[1].data) is bytes
    assert f.log[2].data == b"v" * 8 and type(f.log[2].data) is bytes


def test_rejected_ops_are_not_recorded():
    f = FaultInjectingFile(MemoryFile(b"x" * 10))
    with pytest.raises(ValueError, match="offset=-1"):
        f.pwrite(-1, b"a")
    with pytest.raises(ValueError, match="offset=-4 length=0"):
        f.pwrite(-4, b"")
    with pytest.raises(ValueError):
        f.truncate(-1)
    assert len(f.log) == 0 and f.size() == 10


def test_empty_write_is_recorded_but_never_extends():
    inner = MemoryFile(b"x" * 10)
    f = FaultInjectingFile(inner)
    f.pwrite(100, b"")
    assert len(f.log) == 1 and f.log[0].size_after == 10
    assert f.size() == inner.size() == 10


def test_epoch_helpers_at_every_point():
    log = scripted().log
    expect = {
        # point: (last flush, unsynced indices, durable size, size, sites)
        0: (-1, [], 1024, 1024, ()),
        1: (-1, [0], 1024, 1024, (WriteSite.HEADER,)),
        2: (-1, [0, 1], 1024, 1024, (WriteSite.HEADER, WriteSite.L1)),
        3: (2, [], 1024, 1024, ()),
        4: (2, [3], 1024, 2048, (WriteSite.L2_ALLOC,)),
        5: (2, [3, 4], 1024, 1536, (WriteSite.L2_ALLOC,)),
        6: (5, [], 1536, 1536, ()),
        7: (5, [6], 1536, 1536, (WriteSite.DATA,)),
    }
    for point, (flush, unsynced, durable, size, sites) in expect.items():
        assert log.last_flush_before(point) == flush, point
        assert [op.index for op in log.unsynced(point)] == unsynced, point
        assert log.durable_size(point) == durable, point
        assert log.size_at(point) == size, point
        assert log.sites_at(point) == sites, point


def test_sites_are_listed_once_in_order_of_first_appearance():
    f = FaultInjectingFile(MemoryFile())
    for site in (WriteSite.DATA, WriteSite.L2, WriteSite.DATA, WriteSite.REFBLOCK):
        f.pwrite(0, b"x", site)
    f.truncate(0)
    assert f.log.sites_at(5) == (WriteSite.DATA, WriteSite.L2, WriteSite.REFBLOCK)


@pytest.mark.parametrize(
    "point, problem", [(-1, "is out of range"), (8, "is out of range"), (True, "is a bool, not an int"), ("3", "is a str, not an int")]
)
def test_bad_points_are_rejected_with_the_valid_range(point, problem):
    log = scripted().log
    with pytest.raises(ValueError, match=rf"crash point .* {problem}: a log of 7 ops has points 0\.\.7"):
        log.unsynced(point)


def test_reset_log_starts_from_the_current_content():
    f = scripted()
    old = f.reset_log()
    assert len(old) == 7
    assert len(f.log) == 0 and f.point() == 0
    assert f.log.base == f.inner.getvalue() and f.log.base_size == 1536
    f.pwrite(2000, b"e")
    assert f.log[0].size_after == 2001 and len(old) == 7


def test_wraps_an_os_file(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"p" * 700)
    inner = OsFile(path)
    try:
        f = FaultInjectingFile(inner)
        assert f.log.base == b"p" * 700
        f.pwrite(1000, b"q" * 24, WriteSite.DATA)
        f.flush()
        assert f.size() == inner.size() == 1024
        assert path.read_bytes() == b"p" * 700 + bytes(300) + b"q" * 24
        assert f.log.durable_size(2) == 1024
    finally:
        inner.close()


def test_host_op_prints_its_kind():
    log = scripted().log
    assert str(log[3]) == "#3 write 1024+1024 site=l2-alloc size=2048"
    assert str(log[4]) == "#4 truncate 1536"
    assert str(log[5]) == "#5 flush"


def test_sector_pieces_examples():
    assert sector_pieces(256, 1024) == [(256, 512), (512, 1024), (1024, 1280)]
    assert sector_pieces(512, 512) == [(512, 1024)]
    assert sector_pieces(0, 0) == []
    assert sector_pieces(1023, 2) == [(1023, 1024), (1024, 1025)]


@given(st.integers(0, 5000), st.integers(0, 3000))
def test_sector_pieces_cover_the_range_one_absolute_sector_each(offset, length):
    pieces = sector_pieces(offset, length)
    assert len(pieces) == sector_count(offset, length)
    covered = [b for lo, hi in pieces for b in range(lo, hi)]
    assert covered == list(range(offset, offset + length))
    for j, (lo, hi) in enumerate(pieces):
        assert lo < hi and lo // SECTOR == (hi - 1) // SECTOR
        assert lo // SECTOR - offset // SECTOR == j


host_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 3000), st.binary(max_size=600)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("truncate"), st.integers(0, 4000)),
    ),
    max_size=25,
)


@given(st.binary(max_size=2000), host_ops)
def test_behaves_like_the_inner_file_and_logs_sizes(base, ops):
    plain = MemoryFile(base)
    inner = MemoryFile(base)
    f = FaultInjectingFile(inner)
    for op in ops:
        if op[0] == "write":
            if op[2]:  # (an empty write is a no-op; MemoryFile alone would extend for it)
                plain.pwrite(op[1], op[2])
            f.pwrite(op[1], op[2])
        elif op[0] == "flush":
            plain.flush()
            f.flush()
        else:
            plain.truncate(op[1])
            f.truncate(op[1])
        assert f.log[-1].size_after == f.size() == inner.size() == plain.size()
    assert inner.getvalue() == plain.getvalue()
    assert len(f.log) == len(ops)
    assert f.log.base == base


def test_write_log_can_be_built_by_hand():
    log = WriteLog(b"abc")
    op = log.append(HostOpKind.WRITE, 1, b"ZZ", WriteSite.DATA, 3)
    log.append(HostOpKind.FLUSH, 0, b"", WriteSite.OTHER, 3)
    assert op.index == 0 and log.last_flush_before(2) == 1 and log.unsynced(1) == [op]


@pytest.mark.parametrize("sectors", [0, 1, 7, 64, 65, 128, 200, 4096])
def test_split_sectors_slices_like_a_comprehension(sectors: int) -> None:
    from models.blockio import split_sectors

    data = random.Random(sectors).randbytes(sectors * SECTOR)
    assert split_sectors(data) == [data[o:o + SECTOR] for o in range(0, len(data), SECTOR)]
    assert split_sectors(bytearray(data)) == split_sectors(data)
    with pytest.raises(ValueError, match="whole number"):
        split_sectors(data + b"x")


def test_a_given_log_base_is_kept_as_it_is_and_must_match_the_file():
    data = bytes(range(256)) * 8
    f = FaultInjectingFile(MemoryFile(data), base=data)
    assert f.log.base is data
    f.pwrite(0, b"x" * 512)
    assert f.log.base is data and f.pread(0, 4) == b"xxxx"
    with pytest.raises(ValueError, match="a log base of 2047 bytes for a file of 2048"):
        FaultInjectingFile(MemoryFile(data), base=data[:-1])


def test_a_recorded_op_equals_the_dataclass_built_the_usual_way():
    # WriteLog.append builds HostOp with its slots set directly (faultfile._host_op): field for field
    # the same value as the frozen dataclass's own constructor gives.
    from harness.faultfile import HostOp, HostOpKind, WriteLog, _host_op
    from models.blockio import WriteSite

    fields = (7, HostOpKind.WRITE, 4096, b"\x01" * 512, WriteSite.L2, 8192)
    assert _host_op(*fields) == HostOp(*fields)
    log = WriteLog(b"")
    op = log.append(HostOpKind.TRUNCATE, 1024, b"", WriteSite.OTHER, 1024)
    assert op == HostOp(0, HostOpKind.TRUNCATE, 1024, b"", WriteSite.OTHER, 1024)
    assert (op.index, op.kind, op.offset, op.data, op.site, op.size_after) == (0, HostOpKind.TRUNCATE, 1024, b"",
                                                                               WriteSite.OTHER, 1024)
