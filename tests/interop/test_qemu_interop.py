"""qcrash against real QEMU 7.2 (qemu-img, qemu-io): images written by QEMU read identically by qcrash, fresh images byte for byte, `img info` output, and dirty images made by either side repaired by the other."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from harness.cli.img import parse_size
from models.blockio import OsFile
from models.qcow2.image import Qcow2Image
from tests.conftest import requires_qemu
from tests.interop._tools import qcrash, sh

pytestmark = [pytest.mark.qemu, requires_qemu]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# --------------------------------------------------------------------------- running the tools
def qemu_img(*args, rc: int | None = 0) -> subprocess.CompletedProcess:
    return sh("qemu-img", *args, rc=rc)


def qemu_io(path, commands: list[str], *opts, rc: int | None = 0) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", "qcow2", *opts]
    for c in commands:
        args += ["-c", c]
    return sh(*args, path, rc=rc)


def qemu_raw(path: Path) -> bytes:
    out = path.with_suffix(".raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qcrash_read_all(path: Path) -> bytes:
    f = OsFile(path, readonly=True)
    try:
        img = Qcow2Image.open(f, readonly=True)
        return img.read(0, img.size)
    finally:
        f.close()


def dirty_bit(path: Path) -> bool:
    return bool(struct.unpack_from(">Q", path.read_bytes(), 72)[0] & 1) if _version(path) >= 3 else False


def _version(path: Path) -> int:
    return struct.unpack_from(">I", path.read_bytes(), 4)[0]


def header_field(path: Path, fmt: str, offset: int) -> int:
    return struct.unpack_from(">" + fmt, path.read_bytes(), offset)[0]


def cluster_size_of(create_opts: str) -> int:
    opts = dict(kv.split("=", 1) for kv in create_opts.split(",") if kv)
    return parse_size(opts.get("cluster_size", "65536"))


def check_rc(path: Path) -> int:
    return qemu_img("check", path, rc=None).returncode


# --------------------------------------------------------------------------- a workload and its model
class Workload:
    """qemu-io commands with the bytearray they should leave in the guest."""

    def __init__(self, size: int, cluster: int) -> None:
        self.size, self.cluster = size, cluster
        self.model = bytearray(size)
        self.commands: list[str] = []

    def write(self, off: int, length: int, pattern: int) -> None:
        self.commands.append(f"write -P {pattern:#x} {off} {length}")
        self.model[off : off + length] = bytes([pattern]) * length

    def zero(self, off: int, length: int) -> None:
        self.commands.append(f"write -z {off} {length}")
        self.model[off : off + length] = bytes(length)

    def discard(self, off: int, length: int) -> None:
        # Only whole clusters inside the range are discarded (and then read as zeros).
        self.commands.append(f"discard {off} {length}")
        cs = self.cluster
        first, end = -(-off // cs) * cs, (off + length) // cs * cs
        if end > first:
            self.model[first:end] = bytes(end - first)

    def random(self, rng: random.Random, n: int, *, max_len: int) -> "Workload":
        for _ in range(n):
            kind = rng.random()
            off = rng.randrange(0, self.size - 1)
            length = rng.randrange(1, min(max_len, self.size - off) + 1)
            if kind < 0.7:
                self.write(off, length, rng.randrange(1, 256))
            elif kind < 0.85:
                self.zero(off, length)
            else:
                self.discard(off, length)
        return self


def run_workload(path: Path, work: Workload, *opts, chunk: int = 200) -> None:
    for i in range(0, len(work.commands), chunk):
        qemu_io(path, work.commands[i : i + chunk], *opts)


# --------------------------------------------------------------------------- QEMU writes, qcrash reads
@pytest.mark.parametrize("create_opts, size, seed, n, max_len", [
    ("compat=1.1", 8 * MiB, 1, 60, 200 * KiB),
    ("compat=0.10", 8 * MiB, 2, 60, 200 * KiB),
    ("compat=1.1,cluster_size=4096,refcount_bits=1", 8 * MiB, 3, 80, 40 * KiB),
    ("compat=1.1,cluster_size=2M", 16 * MiB, 4, 30, 3 * MiB),
    ("compat=1.1,cluster_size=512,refcount_bits=8", 4 * MiB, 5, 120, 20 * KiB),  # many L2 tables (32 KiB each)
])
def test_qemu_written_images_read_identically(tmp_path, create_opts, size, seed, n, max_len):
    img = tmp_path / "q.qcow2"
    cs = cluster_size_of(create_opts)
    qemu_img("create", "-q", "-f", "qcow2", "-o", create_opts, img, size)
    work = Workload(size, cs).random(random.Random(seed), n, max_len=max_len)
    # Partial clusters at both ends of a cluster, and a pattern write that straddles two clusters.
    work.write(cs - 3, 7, 0xA1)
    work.write(2 * cs + 1, 1, 0xA2)
    run_workload(img, work)
    expected = qemu_raw(img)
    assert expected == bytes(work.model), "the workload model disagrees with QEMU itself"
    assert qcrash_read_all(img) == expected
    # Reading also works through the CLI, with qemu-io's syntax.
    qcrash("io", "-r", "-c", f"read -P 0xa1 {cs - 3} 7", "-c", f"read -P 0xa2 {2 * cs + 1} 1", img)


def test_qemu_written_image_with_refcount_table_growth(tmp_path):
    """512-byte clusters, 64-bit refcounts: one reftable cluster covers 64 refblocks of 64 clusters (2 MiB of host)."""
    img = tmp_path / "grow.qcow2"
    size = 4 * MiB
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, size)
    assert header_field(img, "I", 56) == 1
    work = Workload(size, 512)
    for i, off in enumerate(range(0, 3 * MiB, 64 * KiB)):
        work.write(off + (i % 7) * 512, 64 * KiB - 1024, i % 250 + 1)
    work.discard(MiB, 64 * KiB)
    work.zero(2 * MiB + 100, 30 * KiB)
    run_workload(img, work)
    assert header_field(img, "I", 56) > 1, "QEMU should have grown the refcount table"
    expected = qemu_raw(img)
    assert expected == bytes(work.model)
    assert qcrash_read_all(img) == expected
    assert qcrash("img", "check", img).returncode == 0


def test_qemu_zero_and_discard_states_read_as_zero(tmp_path):
    """ZERO_PLAIN, ZERO_ALLOC and discarded clusters, v3 and v2."""
    for compat in ("1.1", "0.10"):
        img = tmp_path / f"z{compat}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat},cluster_size=4096", img, MiB)
        work = Workload(MiB, 4096)
        work.write(0, 64 * KiB, 0x11)
        work.zero(4096, 8192)  # allocated -> zero flag (v3) / zero data (v2)
        work.zero(128 * KiB, 4096)  # unallocated -> ZERO_PLAIN
        work.discard(32 * KiB, 4096 + 10)
        work.zero(50 * KiB + 7, 100)  # partial cluster: zero bytes
        run_workload(img, work)
        assert qcrash_read_all(img) == qemu_raw(img) == bytes(work.model)


# --------------------------------------------------------------------------- fresh images, byte for byte
CREATE_CASES = [
    ("", "64M"), ("", "0"), ("", "1000"), ("", "1G"), ("", "100G"), ("", "10T"),
    ("compat=0.10", "64M"), ("compat=v2", "1G"), ("compat=v3", "128M"),
    ("compat=1.1,lazy_refcounts=on", "128M"), ("lazy_refcounts=on", "10T"),
    ("cluster_size=512", "1M"), ("cluster_size=512", "32M"), ("cluster_size=4096", "1G"), ("cluster_size=8k", "3G"),
    ("cluster_size=2M", "1G"), ("cluster_size=2M,compat=0.10", "100G"),
    ("refcount_bits=1", "64M"), ("refcount_bits=2", "1G"), ("refcount_bits=8,cluster_size=4k", "64M"),
    ("refcount_bits=64", "64M"), ("refcount_bits=64,cluster_size=512", "16M"),
]


@pytest.mark.parametrize("opts, size", CREATE_CASES)
def test_fresh_image_equals_qemu_img_create(tmp_path, opts, size):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    o = ["-o", opts] if opts else []
    ours_out = qcrash("img", "create", "-f", "qcow2", *o, ours, size).stdout
    theirs_out = qemu_img("create", "-f", "qcow2", *o, theirs, size).stdout
    assert ours_out.replace(str(ours), "X") == theirs_out.replace(str(theirs), "X")
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("opts, size", [("cluster_size=512", "1G"), ("cluster_size=512,refcount_bits=64", "1G"),
                                        ("cluster_size=512,refcount_bits=1", "4G"),
                                        ("cluster_size=512,refcount_bits=64", "16G")])
def test_fresh_image_layout_differs_but_is_valid_when_l1_spans_several_refblocks(tmp_path, opts, size):
    """With 512-byte clusters the L1 needs more refblocks than one reftable cluster holds: qcrash grows the
    refcount table differently from QEMU. Both are valid; qemu-img check must accept qcrash's."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qcrash("img", "create", "-q", "-o", opts, ours, size)
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, theirs, size)
    assert qemu_img("check", ours).stdout.startswith("No errors were found on the image.")
    assert qcrash("img", "check", theirs).stdout.startswith("No errors were found on the image.")
    # Both describe an empty disk (reading all of it through Python would take too long).
    ours_map = json.loads(qemu_img("map", "--output=json", ours).stdout)
    assert ours_map == json.loads(qemu_img("map", "--output=json", theirs).stdout)
    assert all(not extent["data"] and extent["zero"] for extent in ours_map)
    # The header fields that describe the guest are equal.
    for fmt, off in (("I", 4), ("I", 20), ("Q", 24), ("I", 36)):
        assert header_field(ours, fmt, off) == header_field(theirs, fmt, off)


@pytest.mark.parametrize("opts, size", [("cluster_size=512,refcount_bits=64", "16G"), ("cluster_size=512", "100G")])
def test_fresh_image_size_close_to_qemus_when_create_grows_the_refcount_table(tmp_path, opts, size):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qcrash("img", "create", "-q", "-o", opts, ours, size)
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, theirs, size)
    assert ours.stat().st_size <= theirs.stat().st_size * 1.1, (ours.stat().st_size, theirs.stat().st_size)


def test_discard_of_the_partial_last_cluster_matches_qemu(tmp_path):
    size = 65536 + 512
    commands = [f"write -P 0x11 0 {size}", "discard 65536 512"]
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qcrash("img", "create", "-q", ours, size)
    qemu_img("create", "-q", "-f", "qcow2", theirs, size)
    qcrash("io", *sum((["-c", c] for c in commands), []), ours)
    qemu_io(theirs, commands)
    assert qemu_raw(theirs)[65536:] == bytes(512)
    assert qemu_raw(ours) == qemu_raw(theirs)


@pytest.mark.parametrize("opts, size", [("", "64M"), ("compat=0.10", "1G"), ("compat=1.1,lazy_refcounts=on", "128M"),
                                        ("cluster_size=512,refcount_bits=1", "100M"), ("cluster_size=2M", "1000")])
def test_img_info_equals_qemu_img_info(tmp_path, opts, size):
    img = tmp_path / "i.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), img, size)
    for output in ("json", "human"):
        ours = qcrash("img", "info", "--output", output, img).stdout
        theirs = qemu_img("info", f"--output={output}", img).stdout
        assert ours == theirs


def test_img_info_of_dirty_and_corrupt_images_equals_qemu(tmp_path):
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", img, "128M")
    qemu_io(img, ["write -P 0x5a 0 512", "sigraise 9"], rc=-9)
    for output in ("json", "human"):
        assert qcrash("img", "info", "--output", output, img).stdout == qemu_img("info", f"--output={output}", img).stdout
    data = bytearray(img.read_bytes())
    struct.pack_into(">Q", data, 72, 3)  # dirty + corrupt
    img.write_bytes(bytes(data))
    for output in ("json", "human"):
        assert qcrash("img", "info", "--output", output, img).stdout == qemu_img("info", f"--output={output}", img).stdout


# --------------------------------------------------------------------------- dirty images made by QEMU, repaired by qcrash
def qemu_dirty_image(tmp_path: Path, name: str, create_opts: str, size: int, seed: int, n: int, max_len: int) -> tuple[Path, Workload]:
    img = tmp_path / name
    cs = cluster_size_of(create_opts)
    qemu_img("create", "-q", "-f", "qcow2", "-o", create_opts, img, size)
    work = Workload(size, cs).random(random.Random(seed), n, max_len=max_len)
    # The crash: every write above is durable (writethrough; discards only after a flush, hence the
    # flush) but the refcount increases are postponed.
    qemu_io(img, work.commands + ["flush", "sigraise 9"], "-t", "writethrough", rc=-9)
    assert dirty_bit(img)
    assert check_rc(img) == 2
    return img, work


DIRTY_CASES = [
    # name, create options, virtual size, seed, operations, max length
    ("l2s-and-refblocks", "compat=1.1,lazy_refcounts=on,cluster_size=512", 4 * MiB, 11, 150, 24 * KiB),
    ("4k-r1", "compat=1.1,lazy_refcounts=on,cluster_size=4096,refcount_bits=1", 8 * MiB, 12, 100, 64 * KiB),
    ("64k", "compat=1.1,lazy_refcounts=on", 32 * MiB, 13, 60, 300 * KiB),
    ("512-r64", "compat=1.1,lazy_refcounts=on,cluster_size=512,refcount_bits=64", 3 * MiB, 14, 120, 32 * KiB),
]


@pytest.mark.parametrize("name, opts, size, seed, n, max_len", DIRTY_CASES)
def test_qemu_dirty_image_repaired_by_qcrash_open(tmp_path, name, opts, size, seed, n, max_len):
    img, work = qemu_dirty_image(tmp_path, name + ".qcow2", opts, size, seed, n, max_len)
    assert qcrash_read_all(img) == bytes(work.model), "read-only access works on the dirty image"
    proc = qcrash("io", "-c", "flush", img)  # a read-write open repairs before anything else
    assert "Rebuilding refcount structure" in proc.stderr or "Repairing" in proc.stderr, proc.stderr
    assert not dirty_bit(img)
    assert qemu_img("check", img).returncode == 0
    assert qemu_raw(img) == bytes(work.model)


@pytest.mark.parametrize("name, opts, size, seed, n, max_len", DIRTY_CASES)
def test_qemu_dirty_image_repaired_by_qcrash_check_like_qemu(tmp_path, name, opts, size, seed, n, max_len):
    img, work = qemu_dirty_image(tmp_path, name + ".qcow2", opts, size, seed, n, max_len)
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(img, twin)
    ours = qcrash("img", "check", "-r", "all", img)
    theirs = qemu_img("check", "-r", "all", twin)
    assert (ours.stdout, ours.stderr) == (theirs.stdout, theirs.stderr)
    assert not dirty_bit(img)
    assert qemu_img("check", img).returncode == 0
    assert qemu_raw(img) == bytes(work.model)
    assert img.read_bytes() == twin.read_bytes(), "the repaired files should be identical"


def test_qemu_dirty_image_check_output_equals_qemu(tmp_path):
    img, _work = qemu_dirty_image(tmp_path, "c.qcow2", DIRTY_CASES[0][1], 4 * MiB, 21, 80, 16 * KiB)
    for output in ("human", "json"):
        ours = qcrash("img", "check", "--output", output, img, rc=None)
        theirs = qemu_img("check", f"--output={output}", img, rc=None)
        assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)


def test_failed_leak_repair_keeps_the_dirty_bit_unlike_qemu(tmp_path):
    """`check -r leaks` cannot rebuild a dirty image (exit 1, same output as QEMU). QEMU 7.2 then clears the dirty
    bit on close (qcow2_inactivate -> qcow2_mark_clean) over refcounts it knows are wrong; qcrash keeps it set."""
    img, work = qemu_dirty_image(tmp_path, "l.qcow2", "compat=1.1,lazy_refcounts=on", 128 * MiB, 31, 10, 64 * KiB)
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(img, twin)
    ours = qcrash("img", "check", "-r", "leaks", img, rc=1)
    theirs = qemu_img("check", "-r", "leaks", twin, rc=1)
    assert ours.stdout == theirs.stdout
    assert ours.stderr.replace("qcrash: ", "qemu-img: ") == theirs.stderr
    assert dirty_bit(img), "qcrash: the image stays dirty, so the next read-write open repairs it"
    assert not dirty_bit(twin) and check_rc(twin) == 2, "QEMU 7.2's behaviour (documented divergence)"


# --------------------------------------------------------------------------- dirty images made by qcrash, repaired by QEMU
def qcrash_dirty_image(tmp_path: Path, name: str, create_opts: str, size: int, seed: int, n: int, max_len: int,
                       crash: str = "abort") -> tuple[Path, Workload]:
    img = tmp_path / name
    cs = cluster_size_of(create_opts)
    qcrash("img", "create", "-q", "-o", create_opts, img, size)
    work = Workload(size, cs).random(random.Random(seed), n, max_len=max_len)
    args = ["io"]
    # writethrough makes writes durable at once; discards need the flush (crash contract).
    for c in work.commands + ["flush", crash]:
        args += ["-c", c]
    status = {"abort": 134, "sigraise 9": 137}[crash]
    qcrash(*args, img, rc=status)
    assert dirty_bit(img)
    return img, work


@pytest.mark.parametrize("name, opts, size, seed, n, max_len", DIRTY_CASES)
def test_qcrash_dirty_image_repaired_by_qemu_img_check(tmp_path, name, opts, size, seed, n, max_len):
    img, work = qcrash_dirty_image(tmp_path, name + ".qcow2", opts, size, seed, n, max_len)
    assert qemu_raw(img) == bytes(work.model), "QEMU reads the dirty image read-only"
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(img, twin)
    theirs = qemu_img("check", "-r", "all", img)
    ours = qcrash("img", "check", "-r", "all", twin)
    assert (ours.stdout, ours.stderr) == (theirs.stdout, theirs.stderr)
    assert not dirty_bit(img)
    assert qemu_img("check", img).returncode == 0
    assert qemu_raw(img) == bytes(work.model)


def test_qcrash_dirty_image_repaired_by_qemu_io_open(tmp_path):
    img, work = qcrash_dirty_image(tmp_path, "o.qcow2", "compat=1.1,lazy_refcounts=on,cluster_size=512", 2 * MiB,
                                   41, 60, 16 * KiB, crash="sigraise 9")
    proc = qemu_io(img, ["flush"])
    assert "Rebuilding refcount structure" in proc.stderr
    assert not dirty_bit(img)
    assert qemu_img("check", img).returncode == 0
    assert qemu_raw(img) == bytes(work.model)


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "compat=1.1,cluster_size=512,refcount_bits=16"])
def test_qcrash_crash_without_lazy_refcounts_leaves_no_corruption(tmp_path, opts):
    """Lazy refcounts off: a crash may leak but never corrupts (contract), and QEMU agrees."""
    img = tmp_path / "n.qcow2"
    qcrash("img", "create", "-q", "-o", opts, img, 4 * MiB)
    cs = cluster_size_of(opts)
    work = Workload(4 * MiB, cs).random(random.Random(51), 60, max_len=64 * KiB)
    args = ["io"]
    for c in work.commands + ["flush", "abort"]:
        args += ["-c", c]
    qcrash(*args, img, rc=134)
    assert not dirty_bit(img)
    assert check_rc(img) in (0, 3)
    assert qemu_raw(img) == bytes(work.model)
