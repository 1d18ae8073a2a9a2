"""`qcrash img create` run in-process: qemu-img's Formatting line, the layout it writes, and a `qcrash: <message>` line naming file, option and rule for every error."""

from __future__ import annotations

import pytest

from models.blockio import MemoryFile
from models.qcow2.image import Qcow2Image
from tests.unit._cli_img_tools import MiB, create, run


def test_create_prints_qemu_img_formatting_line(capsys, img):
    rc, out, err = run(capsys, "img", "create", img, "64M")
    assert rc == 0 and err == ""
    assert out == (f"Formatting '{img}', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
                   "size=67108864 lazy_refcounts=off refcount_bits=16\n")


@pytest.mark.parametrize("opts, size, tail", [
    (["compat=1.1,lazy_refcounts=on"], "128M", "size=134217728 compat=1.1 lazy_refcounts=on refcount_bits=16"),
    (["compat=v3,lazy_refcounts=true,cluster_size=512,refcount_bits=1"], "100M",
     "size=104857600 compat=v3 lazy_refcounts=true refcount_bits=1"),
    (["compat=0.10"], "1G", "size=1073741824 compat=0.10 lazy_refcounts=off refcount_bits=16"),
    (["cluster_size=4k", "lazy_refcounts=on,compat=1.1"], "1.5G",
     "size=1610612736 compat=1.1 lazy_refcounts=on refcount_bits=16"),
    (["size=1M"], None, "size=1048576 lazy_refcounts=off refcount_bits=16"),
    ([], "1000", "size=1000 lazy_refcounts=off refcount_bits=16"),
])
def test_create_formatting_line_echoes_options_like_qemu(capsys, img, opts, size, tail):
    args = ["img", "create", "-f", "qcow2"]
    for o in opts:
        args += ["-o", o]
    args.append(img)
    if size is not None:
        args.append(size)
    rc, out, _err = run(capsys, *args)
    assert rc == 0
    assert out.startswith(f"Formatting '{img}', fmt=qcow2 cluster_size=")
    assert out.rstrip("\n").endswith(tail), out


@pytest.mark.parametrize("opts, kw", [
    ([], dict()),
    (["compat=0.10"], dict(version=2)),
    (["compat=1.1,lazy_refcounts=on,cluster_size=4096,refcount_bits=64"],
     dict(lazy_refcounts=True, cluster_size=4096, refcount_bits=64)),
])
def test_create_writes_the_model_layout(img, opts, kw):
    create(img, "64M", *opts)
    mem = MemoryFile(name="x")
    Qcow2Image.create(mem, 64 * MiB, **kw)
    assert img.read_bytes() == mem.getvalue()


def test_create_quiet(capsys, img):
    rc, out, err = run(capsys, "img", "create", "-q", img, "1M")
    assert (rc, out, err) == (0, "", "")


def test_create_overwrites_existing_file(img):
    img.write_bytes(b"x" * 10_000_000)
    create(img, "1M")
    assert img.stat().st_size < 400_000


@pytest.mark.parametrize("opts, size, message, formatting", [
    (["cluster_size=1000"], "1M", "cluster_size = 1000: Cluster size must be a power of two between 512 and 2048k", True),
    (["cluster_size=4M"], "1M", "Cluster size must be a power of two between 512 and 2048k", True),
    (["refcount_bits=3"], "1M", "refcount_bits = 3: Refcount width must be a power of two and may not exceed 64 bits", True),
    (["refcount_bits=128"], "1M", "Refcount width must be a power of two and may not exceed 64 bits", True),
    (["compat=0.10,refcount_bits=8"], "1M", "Different refcount widths than 16 bits require compatibility level 1.1", True),
    (["compat=0.10,lazy_refcounts=on"], "1M", "Lazy refcounts only supported with compatibility level 1.1 and above", True),
    (["cluster_size=512"], "10T", "The image size is too large for file format 'qcow2' (try using a larger cluster size)", True),
    (["compat=2"], "1M", "Parameter 'version' does not accept value '2'", False),
    (["foo=1"], "1M", "Invalid parameter 'foo'", False),
    (["preallocation=full"], "1M", "Invalid parameter 'preallocation'", False),
    (["extended_l2=on"], "1M", "extended_l2=on: extended L2 entries are not supported by qcrash", False),
    (["compression_type=zstd"], "1M", "compression_type=zstd: only zlib", False),
    (["size=1M"], "2M", "The image size must be specified only once", False),
    ([], None, "Image creation needs a size parameter", False),
    (["lazy_refcounts=maybe"], "1M", "lazy_refcounts = 'maybe': must be on or off", False),
    (["refcount_bits=x"], "1M", "Parameter 'refcount_bits' expects a number, got 'x'", False),
])
def test_create_errors_name_file_option_and_rule(capsys, img, opts, size, message, formatting):
    args = ["img", "create"]
    for o in opts:
        args += ["-o", o]
    args.append(img)
    if size is not None:
        args.append(size)
    rc, out, err = run(capsys, *args)
    assert rc != 0
    assert err.startswith("qcrash: "), err
    assert message in err
    # qemu-img prints the Formatting line before it validates the values.
    assert out.startswith("Formatting") == formatting
    if "usage" not in err:
        assert str(img) in err or "error:" in err


@pytest.mark.parametrize("args, message", [
    (["img", "create", "{img}", "12Q"], "image size '12Q'"),
    (["img", "create", "{img}", "-5"], "image size '-5'"),
    (["img", "create", "-f", "raw", "{img}", "1M"], "format 'raw' is not supported"),
    (["img", "create", "{dir}/nonexistent/x.qcow2", "1M"], "Could not create '{dir}/nonexistent/x.qcow2': No such file or directory"),
])
def test_create_usage_and_os_errors(capsys, tmp_path, img, args, message):
    fill = lambda s: s.format(img=img, dir=tmp_path)
    rc, _out, err = run(capsys, *map(fill, args))
    assert rc in (1, 2)
    assert err.startswith("qcrash: ") and fill(message) in err, err
