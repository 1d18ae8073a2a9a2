"""models.qcow2.check on images made by qemu-img/qemu-io (skipped when they are not installed): fresh images, iotest 039's dirty image, a leak, and a rebuild that grows the reftable."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from models.blockio import OsFile
from models.qcow2.check import CheckResult, Fix, check, exit_code, format_human, repair
from models.qcow2.structs import Header
from tests.unit._check_tools import incompat, needs_qemu


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
