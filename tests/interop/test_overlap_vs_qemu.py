"""Overlap protection against QEMU 7.2: a guest write aimed at an L1, L2, refcount table or refcount block is refused by both, marks the image corrupt the same way, and `check -r all` clears the bit in both."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from models.blockio import MemoryFile, OsFile
from models.qcow2 import check as checkmod
from models.qcow2.errors import InvalidImage, MetadataOverlap
from models.qcow2.image import Qcow2Image
from tests.conftest import requires_qemu

pytestmark = [pytest.mark.qemu, requires_qemu]

CS = 0x10000
# A 1 MiB image with one allocating write: reftable 0x10000, refblock 0x20000, L1 0x30000,
# L2 0x40000, data 0x50000. The L2 entry is then pointed (COPIED) at a metadata cluster.
TARGETS = {
    "active L1 table": 0x30000,
    "active L2 table": 0x40000,
    "refcount table": 0x10000,
    "refcount block": 0x20000,
}


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)


def aimed_image(path: Path, target: int) -> None:
    mem = MemoryFile(name=str(path))
    Qcow2Image.create(mem, 1 << 20, cluster_size=CS)
    with Qcow2Image.open(mem) as img:
        img.write(0, b"\x5a" * CS)
    raw = bytearray(mem.getvalue())
    struct.pack_into(">Q", raw, 0x40000, target | (1 << 63))
    path.write_bytes(bytes(raw))


def incompat(path: Path) -> int:
    return struct.unpack_from(">Q", path.read_bytes(), 72)[0]


@pytest.mark.parametrize("name", list(TARGETS))
def test_write_aimed_at_metadata_is_refused_and_marks_corrupt_as_qemu(tmp_path, name):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    aimed_image(ours, TARGETS[name])
    shutil.copy(ours, theirs)
    message = (f"qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with {name}); "
               "further corruption events will be suppressed")

    q = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 512", str(theirs))
    assert message in q.stderr and "write failed: Input/output error" in q.stdout + q.stderr

    log: list[str] = []
    f = OsFile(ours)
    img = Qcow2Image.open(f, log=log.append)
    with pytest.raises(MetadataOverlap, match="Preventing invalid write on metadata"):
        img.write(0, b"\x11" * 512)
    img.close()
    f.close()
    assert log == [message]
    # The same bytes on disk: corrupt bit set by the same header rewrite, the target untouched.
    assert incompat(ours) == incompat(theirs) == 2
    assert ours.read_bytes() == theirs.read_bytes()

    # Opened read-write: refused by both with QEMU's words; read-only: readable.
    q = run("qemu-io", "-f", "qcow2", "-c", "read 0 512", str(theirs))
    assert "qcow2: Image is corrupt; cannot be opened read/write" in q.stderr
    with pytest.raises(InvalidImage, match="qcow2: Image is corrupt; cannot be opened read/write"):
        Qcow2Image.open(MemoryFile(ours.read_bytes(), name=str(ours)))
    assert run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", str(theirs)).returncode == 0
    Qcow2Image.open(MemoryFile(ours.read_bytes(), name=str(ours)), readonly=True).read(0, 512)

    # check -r all clears the corrupt bit in both.
    run("qemu-img", "check", "-r", "all", str(theirs))
    f = OsFile(ours)
    checkmod.repair(f, checkmod.Fix.ALL)
    f.close()
    assert incompat(theirs) & 2 == 0 and incompat(ours) & 2 == 0


def test_l2_allocation_at_offset_0_is_refused_and_marks_corrupt_as_qemu(tmp_path):
    from tests.unit.test_hostile_open_rw import fresh, refblock_past_eof

    raw = fresh()
    refblock_past_eof(raw)
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(bytes(raw))
    q = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 512", str(theirs))
    message = ("qcow2: Marking image as corrupt: Preventing invalid allocation of L2 table at offset 0; "
               "further corruption events will be suppressed")
    assert message in q.stderr
    log: list[str] = []
    f = MemoryFile(bytes(raw), name=str(theirs))
    img = Qcow2Image.open(f, log=log.append)
    with pytest.raises(InvalidImage, match="Preventing invalid allocation of L2 table at offset 0"):
        img.write(0, b"\x11" * 512)
    assert log == [message]
    assert f.getvalue() == theirs.read_bytes()
