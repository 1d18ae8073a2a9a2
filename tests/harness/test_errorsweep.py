"""I/O errors as faults: the fault layer fails host operations as planned; the error-point sweep finds each error-handling bug and nothing in the correct implementation."""

from __future__ import annotations

import pytest

from harness import errorsweep as es
from harness.faultfile import ErrorKind, ErrorPlan, ErrorPoint, FaultInjectingFile, HostOpKind
from models.blockio import MemoryFile
from models.qcow2 import inject
from models.qcow2.errors import HostIOError


def test_eio_write_is_neither_passed_on_nor_recorded():
    f = FaultInjectingFile(MemoryFile(b"a" * 1024), ErrorPlan((ErrorPoint("write", 1),)))
    f.pwrite(0, b"b" * 512)
    with pytest.raises(HostIOError, match="Input/output error"):
        f.pwrite(512, b"c" * 512)
    f.pwrite(512, b"d" * 512)  # one-shot: the next write works
    assert f.inner.getvalue() == b"b" * 512 + b"d" * 512 and len(f.log) == 2


def test_short_write_lands_its_first_sectors_and_records_them():
    f = FaultInjectingFile(MemoryFile(bytes(4096)), ErrorPlan((ErrorPoint("write", 0, ErrorKind.SHORT),)))
    with pytest.raises(HostIOError):
        f.pwrite(0, b"x" * 4096)
    data = f.inner.getvalue()
    assert data[:512] == b"x" * 512 and data[-512:] == bytes(512)
    assert [op.kind for op in f.log] == [HostOpKind.WRITE] and 0 < len(f.log[0].data) < 4096


def test_enospc_only_fails_growth():
    f = FaultInjectingFile(MemoryFile(bytes(1024)), ErrorPlan((ErrorPoint("write", 0, ErrorKind.ENOSPC),
                                                               ErrorPoint("write", 1, ErrorKind.ENOSPC))))
    f.pwrite(0, b"x" * 512)  # write 0 does not grow the file: the point does not apply
    with pytest.raises(HostIOError, match="No space left on device"):
        f.pwrite(1024, b"y" * 512)
    assert f.size() == 1024


def test_flush_read_truncate_errors_and_a_sticky_dead_disk():
    plan = ErrorPlan((ErrorPoint("flush", 0),), sticky=True)
    f = FaultInjectingFile(MemoryFile(bytes(512)), plan)
    with pytest.raises(HostIOError):
        f.flush()
    with pytest.raises(HostIOError):
        f.pread(0, 512)  # sticky: every later operation fails
    with pytest.raises(HostIOError):
        f.truncate(0)
    assert len(f.log) == 0


@pytest.mark.parametrize("bug", sorted(inject.ERROR_BUGS))
def test_each_error_handling_bug_is_found_by_a_substantive_rule(bug):
    inject.set_active([bug])
    try:
        found = next((f for s in range(10) for f in es.sweep_workload(es.generate(s), stop_at_first=False)
                      if f.rule != "swallowed"), None)
    finally:
        inject.set_active([])
    assert found is not None, f"{bug} not found in 10 workloads"
    assert found.rule in ("lost", "corrupt")


def test_correct_implementation_gives_no_finding():
    for s in range(6):
        assert es.sweep_workload(es.generate(s), stop_at_first=False) == []
    for s in range(2):
        assert es.repair_points(s) == []


def _compressed_at(raw: bytes, guest_cluster: int) -> bytes:
    """`raw` with the L2 entry of `guest_cluster` flagged compressed: a read of that cluster raises."""
    import struct

    from models.qcow2 import spec

    buf = bytearray(raw)
    cluster_bits, = struct.unpack_from(">I", buf, 20)
    l1_offset, = struct.unpack_from(">Q", buf, 40)
    l2 = struct.unpack_from(">Q", buf, l1_offset)[0] & spec.L1E_OFFSET_MASK
    at = l2 + 8 * guest_cluster
    entry, = struct.unpack_from(">Q", buf, at)
    assert entry and cluster_bits == 9
    struct.pack_into(">Q", buf, at, entry | spec.QCOW_OFLAG_COMPRESSED)
    return bytes(buf)


@pytest.mark.parametrize("broken", [None, 3, 40])
def test_sectors_read_by_runs_as_one_by_one(broken, monkeypatch):
    # The sweep reads the model's sectors by runs of consecutive ones; the sectors, their bytes, their
    # order and the sector whose read fails (a run read that fails is read one by one) are those of
    # one read per sector. Runs are cut short (_READ_RUN) to have several.
    from models.qcow2.image import Qcow2Image

    monkeypatch.setattr(es, "_READ_RUN", 16)
    mem = MemoryFile(name="runs.qcow2")
    Qcow2Image.create(mem, 1 << 20, cluster_size=512)
    img = Qcow2Image.open(mem)
    for s in list(range(0, 50)) + list(range(60, 70)):
        img.write(s * 512, bytes([s]) * 512)
    img.close()
    raw = mem.getvalue() if broken is None else _compressed_at(mem.getvalue(), broken)
    sectors = list(range(0, 50)) + [55] + list(range(60, 70))

    def one_by_one():
        img = Qcow2Image.open(MemoryFile(raw), readonly=True)
        for s in sectors:
            yield s, img.read(s * 512, 512)

    def outcome(pairs):
        got = []
        try:
            for pair in pairs:
                got.append(pair)
        except Exception as exc:  # noqa: BLE001 (the failure is part of what is compared)
            return got, str(exc)
        return got, None

    runs = outcome(es._sectors_read(Qcow2Image.open(MemoryFile(raw), readonly=True), sectors))
    assert runs == outcome(one_by_one())
    assert len(runs[0]) == (len(sectors) if broken is None else broken) and (runs[1] is None) == (broken is None)
