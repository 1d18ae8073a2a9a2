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
