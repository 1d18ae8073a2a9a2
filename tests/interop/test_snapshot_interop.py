"""Internal snapshots against real QEMU 7.2: qcrash's pass qemu-img check and list, info and read identically; QEMU's apply and delete identically in qcrash; iotests 015 and 029 through the qcrash CLI."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from models.blockio import OsFile
from models.qcow2 import snapshot
from models.qcow2.image import Qcow2Image
from tests.conftest import requires_qemu
from tests.interop._tools import qcrash, sh

pytestmark = [pytest.mark.qemu, requires_qemu]

MiB = 1 << 20


def fast_dir(tmp_path: Path) -> Path:
    """A tmpfs directory when there is one: the CLI runs in writethrough mode, one fdatasync per request."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(dir=shm, prefix="qcrash-snap-"))
        return d
    return tmp_path


def build_with_qcrash(path: Path, *, cluster_size: int, version: int, lazy: bool) -> list[str]:
    """Writes, snapshots, writes over shared clusters, a discard and a zero write; returns the snapshot names."""
    f = OsFile(path, create=True)
    try:
        Qcow2Image.create(f, 4 * MiB, cluster_size=cluster_size, version=version, lazy_refcounts=lazy)
        img = Qcow2Image.open(f)
        img.write(0, b"\x11" * 8192)
        img.write(MiB, b"\x22" * 4096)
        snapshot.create(img, "one", date_sec=1700000000, date_nsec=123000, vm_clock_nsec=3_723_456_000_000)
        img.write(0, b"\x33" * 512)
        img.write(2 * MiB, b"\x44" * 4096)
        snapshot.create(img, "two", date_sec=1700000100)
        img.discard(MiB - MiB % cluster_size, cluster_size)
        img.write_zeroes(3 * MiB, cluster_size)
        img.write(3 * MiB + cluster_size, b"\x55" * 1024)
        img.close()
    finally:
        f.close()
    return ["one", "two"]


def raw_of(path: Path, out: Path, snap: str | None = None) -> bytes:
    args = ["convert", "-O", "raw"] + (["-l", snap] if snap else []) + [path, out]
    sh("qemu-img", *args)
    return out.read_bytes()


def qcrash_view(path: Path, snap: str | None) -> bytes:
    f = OsFile(path, readonly=True)
    try:
        img = Qcow2Image.open(f, readonly=True)
        return snapshot.read(img, snap, 0, img.size) if snap else img.read(0, img.size)
    finally:
        f.close()


@pytest.mark.parametrize("cluster_size,version,lazy", [(4096, 3, False), (65536, 3, True), (512, 2, False)])
def test_qcrash_snapshots_pass_qemu(tmp_path: Path, cluster_size: int, version: int, lazy: bool) -> None:
    img = tmp_path / "a.qcow2"
    names = build_with_qcrash(img, cluster_size=cluster_size, version=version, lazy=lazy)
    assert "No errors were found" in sh("qemu-img", "check", img).stdout
    assert qcrash("img", "snapshot", "-l", img).stdout == sh("qemu-img", "snapshot", "-l", img).stdout
    for fmt in ("human", "json"):
        assert qcrash("img", "info", "--output", fmt, img).stdout == sh("qemu-img", "info", f"--output={fmt}", img).stdout
    for name in names:
        want = raw_of(img, tmp_path / f"{name}.raw", name)
        assert qcrash_view(img, name) == want
        copy = tmp_path / f"applied-{name}.qcow2"
        shutil.copy(img, copy)
        sh("qemu-img", "snapshot", "-a", name, copy)
        assert raw_of(copy, tmp_path / f"applied-{name}.raw") == want
        assert "No errors were found" in sh("qemu-img", "check", copy).stdout


def _qemu_made(tmp_path: Path) -> Path:
    img = tmp_path / "q.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
    sh("qemu-io", "-c", "write -P 0x11 0 8k", "-c", "write -P 0x22 1M 4k", img)
    sh("qemu-img", "snapshot", "-c", "one", img)
    sh("qemu-io", "-c", "write -P 0x33 0 512", "-c", "write -P 0x44 2M 4k", img)
    sh("qemu-img", "snapshot", "-c", "two", img)
    sh("qemu-io", "-c", "discard 1M 4k", "-c", "write -z 4k 4k", img)
    return img


def _same_but_freed(ours: bytes, theirs: bytes, path: Path) -> None:
    """Byte for byte, except clusters QEMU discarded on free (they read zero there; qcrash does not punch holes)."""
    assert len(ours) == len(theirs)
    f = OsFile(path, readonly=True)
    try:
        img = Qcow2Image.open(f, readonly=True)
        cs = img.geo.cluster_size
        for off in range(0, len(ours), cs):
            if ours[off:off + cs] != theirs[off:off + cs]:
                assert not any(theirs[off:off + cs]) and img.refcount(off // cs) == 0, f"cluster {off // cs} differs"
    finally:
        f.close()


@pytest.mark.parametrize("action", [("-a", "one"), ("-a", "two"), ("-a", "1"), ("-d", "one"), ("-d", "two")])
def test_qemu_made_snapshots_apply_and_delete_like_qemu(tmp_path: Path, action: tuple[str, str]) -> None:
    src = _qemu_made(tmp_path)
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    sh("qemu-img", "snapshot", *action, theirs)
    qcrash("img", "snapshot", *action, ours)
    _same_but_freed(ours.read_bytes(), theirs.read_bytes(), ours)
    assert "No errors were found" in sh("qemu-img", "check", ours).stdout
    for name in [s.name for s in snapshot.list_snapshots(Qcow2Image.open(OsFile(ours, readonly=True), readonly=True))]:
        assert qcrash_view(ours, name) == raw_of(theirs, tmp_path / "t.raw", name)


def test_qemu_made_snapshots_read_identically(tmp_path: Path) -> None:
    src = _qemu_made(tmp_path)
    for name in ("one", "two"):
        assert qcrash_view(src, name) == raw_of(src, tmp_path / f"{name}.raw", name)
    assert qcrash_view(src, None) == raw_of(src, tmp_path / "active.raw")


def test_qcrash_create_writes_what_qemu_writes(tmp_path: Path) -> None:
    src = _qemu_made(tmp_path)
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    sh("qemu-img", "snapshot", "-c", "three", theirs)
    f = OsFile(theirs, readonly=True)
    date = snapshot.list_snapshots(Qcow2Image.open(f, readonly=True))[-1]
    f.close()
    f = OsFile(ours)
    img = Qcow2Image.open(f)
    snapshot.create(img, "three", date_sec=date.date_sec, date_nsec=date.date_nsec)
    img.close()
    f.close()
    _same_but_freed(ours.read_bytes(), theirs.read_bytes(), ours)


def test_snapshot_cli_errors_and_exit_codes_match(tmp_path: Path) -> None:
    img = tmp_path / "e.qcow2"
    build_with_qcrash(img, cluster_size=4096, version=3, lazy=False)
    for args in (["-a", "nope"], ["-d", "nope"], ["-d", "1"], ["-c", "x", "-d", "y"], []):
        ours = qcrash("img", "snapshot", *args, img, rc=None)
        theirs = sh("qemu-img", "snapshot", *args, img, rc=None)
        assert ours.returncode == theirs.returncode, args
        assert ours.stdout == theirs.stdout, args
        first = theirs.stderr.splitlines()[0] if theirs.stderr else ""
        assert ours.stderr.splitlines()[:1] == [first.replace("qemu-img:", "qcrash:")][: 1 if first else 0], args


def _iotest_015(run_io, run_img, img: Path) -> list[str]:
    """iotest 015 (1k clusters, 36M: refcount-table growth while rewriting after a snapshot)."""
    out = []
    out.append(run_io("write -P 123 0 36M"))
    out.append(run_img("snapshot", "-c", "snap1"))
    out.append(run_io("write -P 165 0 36M"))
    out.append(run_img("snapshot", "-c", "snap2"))
    out.append(run_img("snapshot", "-a", "snap1"))
    out.append(run_io("read -P 123 0 36M"))
    out.append(run_img("snapshot", "-a", "snap2"))
    out.append(run_io("read -P 165 0 36M"))
    out.append(run_img("check"))
    return out


def _check_filter(text: str) -> str:
    # _filter_qemu_img_check: the iotests drop the allocation summary and the image end offset
    # (host layout: QEMU allocates a long write's clusters in runs, qcrash one by one).
    return "\n".join(line for line in text.splitlines()
                     if "fragmented" not in line and not line.startswith("Image end offset"))


def _io_filter(text: str) -> str:
    # _filter_qemu_io: timings vary; keep the first line of each report.
    return "\n".join(line for line in text.splitlines() if " ops; " not in line)


@pytest.mark.slow
def test_iotest_015_through_qcrash_cli(tmp_path: Path) -> None:
    d = fast_dir(tmp_path)
    try:
        results = {}
        for tool in ("qemu", "qcrash"):
            img = d / f"{tool}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=1k", img, "36M")

            def run_io(cmd, tool=tool, img=img):
                p = (sh("qemu-io", "-f", "qcow2", "-c", cmd, img) if tool == "qemu" else qcrash("io", "-c", cmd, img))
                return _io_filter(p.stdout)

            def run_img(*args, tool=tool, img=img):
                p = sh("qemu-img", *args, img) if tool == "qemu" else qcrash("img", *args, img)
                return _check_filter(p.stdout.replace(str(img), "IMG"))

            results[tool] = _iotest_015(run_io, run_img, img)
        assert results["qcrash"] == results["qemu"]
        assert "No errors were found on the image." in results["qcrash"][-1]
    finally:
        if d != tmp_path:
            shutil.rmtree(d, ignore_errors=True)


def test_iotest_029_smaller_snapshot_l1(tmp_path: Path) -> None:
    """iotest 029: load a snapshot whose L1 table is smaller than the active one (VM state grew it).

    qcrash's io has no `write -b` (VM state), so QEMU makes that write; create, apply and check
    go through qcrash on one copy and through qemu-img on another, with the same results."""
    for cluster, size, vmwrite in (("65536", "64M", "write -b 0 4k"), ("1024", "16M", "write -b 0 4M")):
        outs = {}
        for tool in ("qemu", "qcrash"):
            img = tmp_path / f"{tool}-{cluster}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", img, size)
            run = (lambda *a, img=img: sh("qemu-img", *a, img).stdout) if tool == "qemu" else (
                lambda *a, img=img: qcrash("img", *a, img).stdout)
            run("snapshot", "-c", "foo")
            sh("qemu-io", "-f", "qcow2", "-c", vmwrite, img)
            run("snapshot", "-a", "foo")
            outs[tool] = tuple(_check_filter(out) for out in (run("check"), sh("qemu-img", "check", img).stdout))
        assert outs["qcrash"] == outs["qemu"], cluster
        assert "No errors were found on the image." in outs["qcrash"][1]
