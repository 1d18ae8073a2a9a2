"""Broken snapshot tables against QEMU 7.2: `qemu-img check` prints and counts what qcrash's check does, and the overlap guard protects the snapshot table and the inactive L1 tables as qemu-io does."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from models.blockio import MemoryFile
from models.qcow2 import check as checkmod
from models.qcow2.errors import InvalidImage, MetadataOverlap
from models.qcow2.image import Qcow2Image
from tests.conftest import requires_qemu
from tests.unit.test_snapshot_hostile import entry_field, with_snapshot

pytestmark = [pytest.mark.qemu, requires_qemu]

BREAKS = {
    "incomplete": lambda raw, sn, table: entry_field(raw, table, 36, "I", 8),
    "unaligned-l1": lambda raw, sn, table: entry_field(raw, table, 0, "Q", sn.l1_table_offset + 8),
    "too-many": lambda raw, sn, table: struct.pack_into(">I", raw, 60, 65537),
    "extra-data": lambda raw, sn, table: entry_field(raw, table, 36, "I", 1025),
}


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", list(BREAKS))
def test_check_of_a_broken_snapshot_table_matches_qemu(tmp_path: Path, kind: str) -> None:
    raw, sn, table = with_snapshot()
    BREAKS[kind](raw, sn, table)
    path = tmp_path / "t.qcow2"
    path.write_bytes(bytes(raw))
    q = run("qemu-img", "check", str(path))
    theirs = [line for line in q.stderr.splitlines() if not line.startswith("qemu-img: Check failed")]
    ours = checkmod.check(MemoryFile(bytes(raw), name=str(path)))
    assert ours.messages == theirs
    assert checkmod.exit_code(ours) == q.returncode
    # The open: QEMU refuses exactly where qcrash does.
    opened = run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", str(path))
    try:
        Qcow2Image.open(MemoryFile(bytes(raw), name=str(path)), readonly=True).close()
        assert opened.returncode == 0, opened.stderr
    except InvalidImage as exc:
        assert opened.returncode != 0 and exc.rule.split(" (")[0] in opened.stderr


@pytest.mark.parametrize("aim", ["snapshot table", "inactive L1 table"])
def test_write_aimed_at_snapshot_metadata_matches_qemu(tmp_path: Path, aim: str) -> None:
    raw, sn, table = with_snapshot()
    l2 = Qcow2Image.open(MemoryFile(bytes(raw)), readonly=True).l1[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", raw, l2, (table if aim == "snapshot table" else sn.l1_table_offset) | (1 << 63))
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(bytes(raw))
    q = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 512", str(theirs))
    assert f"overlaps with {aim}" in q.stderr
    f = MemoryFile(bytes(raw), name=str(theirs))
    img = Qcow2Image.open(f)
    with pytest.raises(MetadataOverlap, match=f"overlaps with {aim}"):
        img.write(0, b"\x33" * 512)
    assert f.getvalue() == theirs.read_bytes()  # the same corrupt bit by the same header rewrite, nothing else
