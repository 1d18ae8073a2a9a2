"""Hypothesis property: images written by qcrash's Qcow2Image under random operation sequences and configurations pass real `qemu-img check` and read back, through `qemu-img convert -O raw`, exactly as a bytearray model of the writes."""

from __future__ import annotations

import random
import subprocess

import pytest
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st

from harness.fuzz.machine import configs as machine_configs
from models.blockio import MemoryFile
from models.qcow2.image import Qcow2Image
from tests.conftest import requires_qemu

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_qemu]

KiB, MiB = 1 << 10, 1 << 20
CACHE_MODES = ["writeback", "writethrough", "directsync"]

# Each example costs two QEMU runs and up to a few MiB of Python I/O (about 0.1 s): the loaded profile's
# count as it is (ci: 60), but a tenth of a nightly-sized one, so one file stays well under a minute.
_loaded = settings()
EXAMPLES = _loaded.max_examples if _loaded.max_examples <= 200 else _loaded.max_examples // 10


@st.composite
def configs(draw) -> dict:
    """The harness's one configuration generator (small clusters and wide refcounts favoured, so refcount
    blocks and refcount-table growth come within a few MiB), on larger disks than a crash run uses."""
    size = draw(st.sampled_from([4, 8, 16, 32])) * MiB
    c = draw(machine_configs({"virtual_size": size}))
    return dict(version=c.version, cluster_size=c.cluster_size, refcount_bits=c.refcount_bits,
                lazy_refcounts=c.lazy_refcounts, size=size, cache=c.cache_mode)


@st.composite
def operations(draw, cfg: dict) -> list[tuple]:
    size, cs = cfg["size"], cfg["cluster_size"]
    # Up to 1 MiB per request: with 512-byte clusters and 64-bit refcounts the first refcount table
    # covers only 2 MiB of host file, so a few large writes make it grow.
    max_len = max(4 * cs, MiB) if cs < 2 * MiB else 3 * cs
    ops = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["write", "write", "write", "zeroes", "discard", "flush", "reopen", "fill"]))
        if kind == "fill":
            # A long sequential write (2-4 MiB): enough host clusters for refcount-table growth at small
            # cluster sizes and wide refcounts.
            off = draw(st.integers(0, size // cs - 1)) * cs
            length = min(draw(st.integers(2, 4)) * MiB, size - off)
            ops.append(("write", off, length, draw(st.integers(0, 2**32 - 1))))
        elif kind in ("write", "zeroes", "discard"):
            aligned = draw(st.booleans())
            if aligned:
                off = draw(st.integers(0, size // cs - 1)) * cs
                length = min(draw(st.integers(1, 4)) * cs, size - off)
            else:
                off = draw(st.integers(0, size - 1))
                length = draw(st.one_of(st.integers(1, min(4 * cs, size - off)),
                                        st.integers(1, min(max_len, size - off))))
            ops.append((kind, off, length, draw(st.integers(0, 2**32 - 1)) if kind == "write" else 0))
        elif kind == "reopen":
            lazy = cfg["version"] == 3 and draw(st.booleans())
            ops.append(("reopen", lazy, draw(st.sampled_from(CACHE_MODES))))
        else:
            ops.append(("flush",))
    return ops


def apply(cfg: dict, ops: list[tuple]) -> tuple[bytes, bytearray]:
    """Run the operations on a fresh in-memory image; return the host file and the guest model."""
    size, cs = cfg["size"], cfg["cluster_size"]
    mem = MemoryFile(name="prop.qcow2")
    Qcow2Image.create(mem, size, version=cfg["version"], cluster_size=cs, refcount_bits=cfg["refcount_bits"],
                      lazy_refcounts=cfg["lazy_refcounts"])
    img = Qcow2Image.open(mem, cache_mode=cfg["cache"])
    model = bytearray(size)
    for op in ops:
        if op[0] == "write":
            _, off, length, seed = op
            data = random.Random(seed).randbytes(length)
            img.write(off, data)
            model[off : off + length] = data
        elif op[0] == "zeroes":
            _, off, length, _ = op
            img.write_zeroes(off, length)
            model[off : off + length] = bytes(length)
        elif op[0] == "discard":
            _, off, length, _ = op
            img.discard(off, length)
            first, end = -(-off // cs) * cs, (off + length) // cs * cs  # whole clusters only
            if end > first:
                model[first:end] = bytes(end - first)
        elif op[0] == "flush":
            img.flush()
        else:
            _, lazy, cache = op
            img.close()
            img = Qcow2Image.open(mem, cache_mode=cache, lazy_refcounts=lazy)
        if op[0] != "flush" and size <= 8 * MiB:  # the open image reads back the model after every step
            assert img.read(0, size) == model, f"after {op[0]}: qcrash reads something else than was written"
    img.close()
    if img.hdr.refcount_table_offset != cfg["cluster_size"]:
        event("refcount table grew")
    return mem.getvalue(), model


def qemu(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vs-qemu")


@st.composite
def cases(draw) -> tuple[dict, list[tuple]]:
    cfg = draw(configs())
    return cfg, draw(operations(cfg))


def _cfg(version, cs, bits, lazy, size, cache="writethrough"):
    return dict(version=version, cluster_size=cs, refcount_bits=bits, lazy_refcounts=lazy, size=size, cache=cache)


# Explicit examples: the refcount-table growth paths, which random configurations rarely reach in 60 examples.
GROWTH_V3 = (_cfg(3, 512, 64, False, 4 * MiB, "writeback"),
             [("write", 0, 3 * MiB, 1), ("discard", MiB, 64 * KiB, 0), ("reopen", True, "writethrough"),
              ("write", 3 * MiB + 77, 300 * KiB, 2), ("zeroes", 512, 4096, 0), ("flush",), ("reopen", False, "directsync"),
              ("write", MiB + 100, 1000, 3)])
GROWTH_V2 = (_cfg(2, 512, 16, False, 16 * MiB),
             [("write", 0, 4 * MiB, 4), ("write", 4 * MiB, 4 * MiB, 5), ("discard", 2 * MiB, 3 * MiB, 0),
              ("write", 9 * MiB + 1, 2 * MiB, 6)])
BIG_CLUSTERS = (_cfg(3, 2 * MiB, 1, True, 8 * MiB),
                [("write", 5, 100, 7), ("write", 2 * MiB - 3, 10, 8), ("zeroes", 4 * MiB, 2 * MiB, 0),
                 ("discard", 0, 2 * MiB, 0), ("reopen", False, "writeback"), ("write", 6 * MiB, 2 * MiB, 9)])


@settings(max_examples=EXAMPLES)
@example(case=GROWTH_V3)
@example(case=GROWTH_V2)
@example(case=BIG_CLUSTERS)
@given(case=cases())
def test_qcrash_images_pass_qemu_check_and_read_back(case, workdir):
    cfg, ops = case
    note(f"config {cfg}")
    event(f"v{cfg['version']} cluster_size={cfg['cluster_size']}")
    event(f"refcount_bits={cfg['refcount_bits']} lazy={cfg['lazy_refcounts']}")
    image, model = apply(cfg, ops)
    if cfg["version"] >= 3:
        assert not image[79] & 1, "a clean close must leave the dirty bit clear"
    path = workdir / "prop.qcow2"
    raw = workdir / "prop.raw"
    path.write_bytes(image)
    check = qemu("qemu-img", "check", path)
    assert check.returncode == 0, f"qemu-img check rc={check.returncode}\n{check.stdout}\n{check.stderr}"
    convert = qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw)
    assert convert.returncode == 0, convert.stderr
    got = raw.read_bytes()
    if got != model:
        first = next(i for i in range(len(model)) if got[i] != model[i])
        pytest.fail(f"guest data differs from the model at offset {first:#x} (sector {first // 512}): "
                    f"QEMU reads {got[first:first + 8].hex()}, model {bytes(model[first:first + 8]).hex()}")
    # qcrash's own check agrees with QEMU's verdict on its images.
    from models.qcow2 import check as checkmod

    assert checkmod.exit_code(checkmod.check(MemoryFile(image, name="prop.qcow2"))) == 0
