"""`qcrash img info` run in-process: human and JSON output as qemu-img's, dirty and corrupt images, and one-line errors."""

from __future__ import annotations

import json
import re
import struct

import pytest

from tests.unit._cli_img_tools import MiB, create, dirty_bit, lines, run


def test_info_human(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    rc, out, err = run(capsys, "img", "info", img)
    assert rc == 0 and err == ""
    got = lines(out)
    assert got[:3] == [f"image: {img}", "file format: qcow2", "virtual size: 128 MiB (134217728 bytes)"]
    assert re.fullmatch(r"disk size: [0-9.]+ (B|KiB|MiB)", got[3])
    assert got[4:] == ["cluster_size: 65536", "Format specific information:", "    compat: 1.1",
                       "    compression type: zlib", "    lazy refcounts: true", "    refcount bits: 16",
                       "    corrupt: false", "    extended l2: false"]


def test_info_json(capsys, img):
    create(img, "64M")
    rc, out, _ = run(capsys, "img", "info", "--output", "json", img)
    assert rc == 0
    info = json.loads(out)
    assert list(info) == ["virtual-size", "filename", "cluster-size", "format", "actual-size", "format-specific",
                          "dirty-flag"]
    assert info["virtual-size"] == 64 * MiB and info["filename"] == str(img) and info["cluster-size"] == 65536
    assert info["actual-size"] == img.stat().st_blocks * 512
    assert info["format-specific"] == {"type": "qcow2", "data": {
        "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False, "refcount-bits": 16,
        "corrupt": False, "extended-l2": False}}
    assert info["dirty-flag"] is False
    assert out.startswith('{\n    "virtual-size": 67108864,\n')


def test_info_v2_omits_v3_only_fields(capsys, img):
    create(img, "1G", "compat=0.10")
    rc, out, _ = run(capsys, "img", "info", "--output=json", img)
    assert json.loads(out)["format-specific"]["data"] == {"compat": "0.10", "compression-type": "zlib",
                                                          "refcount-bits": 16}
    rc, out, _ = run(capsys, "img", "info", img)
    assert lines(out)[-3:] == ["    compat: 0.10", "    compression type: zlib", "    refcount bits: 16"]


def test_info_of_dirty_image(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    assert run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", img)[0] == 137
    rc, out, _ = run(capsys, "img", "info", img)
    assert "cleanly shut down: no" in lines(out)
    assert lines(out).index("cleanly shut down: no") == 5
    rc, out, _ = run(capsys, "img", "info", "--output", "json", img)
    assert json.loads(out)["dirty-flag"] is True
    assert dirty_bit(img), "info must not repair"


def test_info_of_corrupt_image(capsys, img):
    create(img, "1M")
    data = bytearray(img.read_bytes())
    struct.pack_into(">Q", data, 72, 2)
    img.write_bytes(bytes(data))
    rc, out, _ = run(capsys, "img", "info", "--output", "json", img)
    assert rc == 0 and json.loads(out)["format-specific"]["data"]["corrupt"] is True


@pytest.mark.parametrize("setup, message", [
    (None, "{img}: Could not open '{img}': No such file or directory"),
    (b"not an image" * 10, "{img} at offset 0x0: magic = 0x6e6f7420: Image is not in qcow2 format"),
    (b"QFI\xfb", "{img} at offset 0x0: file size = 0x4: too short for a qcow2 header"),
    ("dir", "{img}: Could not open '{img}': Is a directory"),
])
def test_info_errors(capsys, img, setup, message):
    if setup == "dir":
        img.mkdir()
    elif setup is not None:
        img.write_bytes(setup)
    rc, out, err = run(capsys, "img", "info", img)
    assert rc == 1 and out == ""
    assert err == "qcrash: " + message.format(img=img) + "\n" or err.startswith("qcrash: " + message.format(img=img))


def test_info_refuses_other_formats(capsys, img):
    create(img, "1M")
    rc, _, err = run(capsys, "img", "info", "-f", "vmdk", img)
    assert rc == 1 and "format 'vmdk' is not supported" in err  # qemu-img's status for a usage error
