"""The qemu-img/qemu-io work-alike command line (`qcrash img create|info|check`, `qcrash io`), run in-process: output text, exit codes, and a `qcrash: <message>` line (never a traceback) for every error."""

from __future__ import annotations

import io
import json
import re
import struct

import pytest

from harness.cli import img as cli_img
from harness.cli import io as cli_io
from harness.cli import UsageError, main
from models.blockio import MemoryFile
from models.qcow2.image import Qcow2Image

MiB = 1 << 20
TIMING = r"[0-9.]+ (bytes|KiB|MiB|GiB|TiB), 1 ops; (\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \([0-9.]+ (bytes|KiB|MiB|GiB|TiB|PiB|EiB)/sec and [0-9.]+ ops/sec\)"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def lines(text: str) -> list[str]:
    return text.splitlines()


@pytest.fixture
def img(tmp_path):
    return tmp_path / "t.qcow2"


def create(path, size="128M", *opts):
    args = ["img", "create", "-q"]
    for o in opts:
        args += ["-o", o]
    assert main(args + [str(path), size]) == 0


def dirty_bit(path) -> bool:
    return bool(path.read_bytes()[79] & 1)


# --------------------------------------------------------------------------- parsing helpers
@pytest.mark.parametrize("text, value", [
    ("0", 0), ("512", 512), ("1k", 1024), ("1K", 1024), ("64M", 64 * MiB), ("1G", 1 << 30), ("2T", 2 << 40),
    ("1P", 1 << 50), ("1.5G", 3 << 29), ("0.5k", 512), ("100b", 100), ("0x1000", 4096), (" 7", 7),
    ("0x10k", 16384), ("+1k", 1024), ("1.k", 1024),  # as qemu-img 7.2 reads them (tests/interop/test_sizes_vs_qemu.py)
])
def test_parse_size(text, value):
    assert cli_img.parse_size(text) == value


@pytest.mark.parametrize("text, match", [
    ("-5", "invalid"), ("12Q", "invalid|unknown suffix"), ("1.5", "a fraction needs"), ("abc", "invalid"),
    ("8E", "too large"), ("", "invalid"), ("7 ", "invalid"), (".5M", "invalid"),
])
def test_parse_size_errors(text, match):
    with pytest.raises(UsageError, match=match):
        cli_img.parse_size(text, "size")


@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (1000, "0.977 KiB"), (1024, "1 KiB"), (200704, "196 KiB"), (20480, "20 KiB"),
    (12345856, "11.8 MiB"), (67108864, "64 MiB"), (3 << 29, "1.5 GiB"), (1023 * 1024, "0.999 MiB"),
])
def test_size_to_str_matches_qemu(value, text):
    assert cli_img.size_to_str(value) == text


@pytest.mark.parametrize("value, text", [
    (512, "512 bytes"), (1, "1 bytes"), (552.806877, "552.806877 bytes"), (65536, "64 KiB"),
    (406210.5, "396.690 KiB"), (5.461 * (1 << 30), "5.461 GiB"),
])
def test_cvtstr_matches_qemu_io(value, text):
    assert cli_io._cvtstr(value) == text


def test_io_report_first_line_and_timing_format():
    report = cli_io.io_report("wrote", 0, 512, 0.00129)
    first, second = report.splitlines()
    assert first == "wrote 512/512 bytes at offset 0"
    assert re.fullmatch(TIMING, second), second
    assert second.startswith("512 bytes, 1 ops; 00.00 sec (")
    assert "1:02:05.50" in cli_io.io_report("read", 0, 1, 3725.5)


# --------------------------------------------------------------------------- img create
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


# --------------------------------------------------------------------------- img info
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


# --------------------------------------------------------------------------- io
def test_io_write_read_output(capsys, img):
    create(img, "1M")
    rc, out, err = run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "read -P 0x5a 0 512", "-c", "write -z 64k 64k",
                       "-c", "discard 0 64k", "-c", "flush", "-c", "read -P 0 0 128k", img)
    assert rc == 0 and err == ""
    got = lines(out)
    assert got[0::2] == ["wrote 512/512 bytes at offset 0", "read 512/512 bytes at offset 0",
                         "wrote 65536/65536 bytes at offset 65536", "discard 65536/65536 bytes at offset 0",
                         "read 131072/131072 bytes at offset 0"]
    for timing in got[1::2]:
        assert re.fullmatch(TIMING, timing), timing


def test_io_default_pattern_is_0xcd(capsys, img):
    create(img, "1M")
    run(capsys, "io", "-c", "write 1000 100", img)
    assert run(capsys, "io", "-r", "-c", "read -P 0xcd 1000 100", "-c", "read -P 0 900 100", img)[0] == 0


def test_io_quiet_commands(capsys, img):
    create(img, "1M")
    rc, out, err = run(capsys, "io", "-c", "write -q -P 1 0 512", "-c", "read -q -P 1 0 512", "-c", "discard -q 0 64k", img)
    assert (rc, out, err) == (0, "", "")


def test_io_pattern_mismatch_reports_and_exits_1_but_goes_on(capsys, img):
    create(img, "1M")
    rc, out, _ = run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "read -P 0x5b 0 512", "-c", "write -P 1 4096 512", img)
    assert rc == 1
    got = lines(out)
    assert got[2] == "Pattern verification failed at offset 0, 512 bytes"
    assert got[3] == "read 512/512 bytes at offset 0"
    assert got[5] == "wrote 512/512 bytes at offset 4096", "later commands still run"


def test_io_read_pattern_sub_range(capsys, img):
    create(img, "1M")
    run(capsys, "io", "-c", "write -P 7 100 50", img)
    assert run(capsys, "io", "-c", "read -P 7 -s 100 -l 50 0 512", img)[0] == 0
    rc, out, _ = run(capsys, "io", "-c", "read -P 7 -s 99 -l 50 0 512", img)
    assert rc == 1 and "Pattern verification failed at offset 99, 50 bytes" in out


def test_io_request_out_of_range(capsys, img):
    create(img, "1M")
    rc, out, err = run(capsys, "io", "-c", "write 0 2M", "-c", "write -P 3 0 512", img)
    assert rc == 1
    assert err.startswith(f"qcrash: write failed: {img}: write offset=0 length=2097152: must lie within the virtual size 1048576")
    assert "wrote 512/512 bytes at offset 0" in out


def test_io_read_only_refuses_writes(capsys, img):
    create(img, "1M")
    before = img.read_bytes()
    rc, _out, err = run(capsys, "io", "-r", "-c", "write 0 512", "-c", "discard 0 64k", img)
    assert rc == 1
    assert f"qcrash: write failed: {img}: write: image opened read-only" in err
    assert f"qcrash: discard failed: {img}: discard: image opened read-only" in err
    assert img.read_bytes() == before


@pytest.mark.parametrize("command, status", [("abort", 134), ("sigraise 9", 137), ("sigraise 6", 134)])
def test_io_abort_stops_at_once_without_close(capsys, img, command, status):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    rc, out, _ = run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", command, "-c", "write -P 1 0 512", img)
    assert rc == status
    assert lines(out).count("wrote 512/512 bytes at offset 0") == 1, "nothing runs after the crash"
    assert dirty_bit(img), "no clean close: the dirty bit stays set"
    assert run(capsys, "io", "-r", "-c", "read -P 0x5a 0 512", img)[0] == 0


def test_io_clean_exit_closes_cleanly(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    assert run(capsys, "io", "-c", "write -P 0x5a 0 512", img)[0] == 0
    assert not dirty_bit(img)


@pytest.mark.parametrize("cache, visible", [("writethrough", True), ("directsync", True), ("writeback", False)])
def test_io_cache_modes(capsys, img, cache, visible):
    """Only writethrough/directsync make a write durable (L2 on disk) before the crash; qemu-io's default is writethrough."""
    create(img, "1M")
    args = ["io"] + (["-t", cache] if cache != "writethrough" else []) + ["-c", "write -P 0x5a 0 512", "-c", "abort", img]
    assert run(capsys, *args)[0] == 134
    rc, out, _ = run(capsys, "io", "-r", "-c", "read -P 0x5a 0 512", img)
    assert (rc == 0) == visible


def test_io_lazy_option_and_reopen(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=off")
    assert run(capsys, "io", "-o", "lazy-refcounts=on", "-c", "write 0 512", "-c", "abort", img)[0] == 134
    assert dirty_bit(img)
    run(capsys, "img", "check", "-r", "all", img)
    assert not dirty_bit(img)
    # A runtime switch (reopen) on a lazy=off image: the next allocating write sets the bit.
    assert run(capsys, "io", "-c", "reopen -o lazy-refcounts=on", "-c", "write 64k 512", "-c", "sigraise 9", img)[0] == 137
    assert dirty_bit(img)


def test_io_reopen_lazy_off_on_dirty_session_marks_clean(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    rc, _, _ = run(capsys, "io", "-c", "write 0 512", "-c", "reopen -o lazy-refcounts=off", "-c", "write 64k 512",
                   "-c", "sigraise 9", img)
    assert rc == 137 and not dirty_bit(img)


def test_io_lazy_on_v2_is_refused(capsys, img):
    create(img, "1M", "compat=0.10")
    rc, _, err = run(capsys, "io", "-o", "lazy-refcounts=on", "-c", "flush", img)
    assert rc == 1 and "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level" in err
    rc, _, err = run(capsys, "io", "-c", "reopen -o lazy-refcounts=on", img)
    assert rc == 1 and err.startswith("qcrash: reopen failed: ") and "Lazy refcounts require" in err


def test_io_dirty_image_is_repaired_on_read_write_open(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", img)
    rc, out, err = run(capsys, "io", "-c", "write 0 512", img)
    assert rc == 0
    assert lines(err) == ["ERROR cluster 5 refcount=0 reference=1", "Rebuilding refcount structure",
                          "Repairing cluster 1 refcount=1 reference=0", "Repairing cluster 2 refcount=1 reference=0"]
    assert lines(out)[0] == "wrote 512/512 bytes at offset 0"
    assert not dirty_bit(img)


def test_io_read_only_open_of_dirty_image_does_not_repair(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", img)
    before = img.read_bytes()
    rc, _out, err = run(capsys, "io", "-r", "-c", "read -P 0x5a 0 512", img)
    assert rc == 0 and err == ""
    assert img.read_bytes() == before


@pytest.mark.parametrize("command, message", [
    ("foo", 'command "foo" not found'),
    ("", "empty command"),
    ("write -P 300 0 512", "300 is not a valid pattern byte"),
    ("write -P x 0 512", "x is not a valid pattern byte"),
    ("write 0", "write: expected an offset and a length"),
    ("write -c 0 512", "write: option -c (compressed) is not supported by qcrash"),
    ("write -s f 0 512", "write: option -s (source file) is not supported"),
    ("write -x 0 512", "write: option -x not recognized"),
    ("write -z -P 1 0 512", "-z and -P cannot be specified at the same time"),
    ("read -v 0 512", "read: option -v (dump) is not supported"),
    ("read -P 1 -s 400 -l 200 0 512", "lies outside the 512-byte request"),
    ("read 0 1Q", "read length '1Q'"),
    ("discard 0", "discard: expected an offset and a length"),
    ("flush now", "flush: unexpected argument(s) now"),
    ("sigraise 15", "sigraise: qcrash supports signals 6 (SIGABRT) and 9 (SIGKILL) only"),
    ("reopen", "reopen: nothing to change"),
    ("reopen -o cache.direct=on", "reopen -o 'cache.direct' is not supported"),
    ("reopen -o lazy-refcounts=perhaps", "lazy-refcounts = 'perhaps': must be on or off"),
    ("reopen -r", "reopen: option -r (read-only reopen) is not supported"),
    ("write 'unclosed 0 1", "No closing quotation"),
])
def test_io_command_usage_errors(capsys, img, command, message):
    create(img, "1M")
    before = img.read_bytes()
    rc, out, err = run(capsys, "io", "-c", "write 0 512", "-c", command, img)
    assert rc == 1, (out, err)  # qemu-io's status for a bad command
    assert err.startswith("qcrash: error: ") and message in err, err
    assert out == "" and img.read_bytes() == before, "commands are all parsed before the image is opened"


@pytest.mark.parametrize("args, message, status", [
    (["-t", "none"], "-t 'none' is not supported by qcrash", 1),
    (["-t", "unsafe"], "-t 'unsafe' is not supported by qcrash", 1),
    (["-t", "fast"], "-t 'fast': invalid cache mode", 1),
    (["-o", "lazy-refcounts"], "-o 'lazy-refcounts': expected key=value", 1),
    (["-o", "discard=unmap"], "-o 'discard' is not supported", 1),
    (["-f", "raw"], "format 'raw' is not supported", 1),
])
def test_io_option_errors(capsys, img, args, message, status):
    create(img, "1M")
    rc, _out, err = run(capsys, "io", *args, "-c", "flush", img)
    assert rc == status and err.startswith("qcrash: ") and message in err, err


def test_io_open_errors(capsys, tmp_path):
    missing = tmp_path / "missing.qcow2"
    rc, _, err = run(capsys, "io", "-c", "flush", missing)
    assert rc == 1 and err == f"qcrash: {missing}: Could not open '{missing}': No such file or directory\n"
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(4096))
    rc, _, err = run(capsys, "io", "-c", "flush", bad)
    assert rc == 1 and err.startswith(f"qcrash: {bad} at offset 0x0: magic = 0x0: Image is not in qcow2 format")


def test_io_corrupt_image_refused_read_write_but_readable(capsys, img):
    create(img, "1M")
    data = bytearray(img.read_bytes())
    struct.pack_into(">Q", data, 72, 2)
    img.write_bytes(bytes(data))
    rc, _, err = run(capsys, "io", "-c", "write 0 512", img)
    assert rc == 1 and "qcow2: Image is corrupt; cannot be opened read/write" in err
    assert run(capsys, "io", "-r", "-c", "read -P 0 0 512", img)[0] == 0


def test_io_metadata_corruption_stops_the_run(capsys, img):
    create(img, "1M")
    run(capsys, "io", "-c", "write 0 512", img)
    data = bytearray(img.read_bytes())
    struct.pack_into(">Q", data, 0x30000, 0x8000000000040200)  # unaligned L2 offset
    img.write_bytes(bytes(data))
    rc, out, err = run(capsys, "io", "-c", "read 0 512", "-c", "write 0 512", img)
    assert rc == 1 and out == ""
    assert err == (f"qcrash: read failed: {img} at offset 0x30000: L1[0] = 0x8000000000040200: L2 table offset 0x40200 "
                   "not aligned to cluster size 0x10000\n")


def test_internal_errors_print_one_line_not_a_traceback(capsys, img, monkeypatch):
    create(img, "1M")

    def boom(*_a, **_k):
        raise RuntimeError("simulated")

    monkeypatch.setattr(cli_img, "image_info", boom)
    rc, _, err = run(capsys, "img", "info", img)
    assert rc == cli_img.EXIT_INTERNAL
    assert err == "qcrash: internal error: RuntimeError: simulated (set QCRASH_TRACEBACK=1 for the traceback)\n"


def test_argparse_errors_are_qcrash_lines(capsys, img):
    rc, _, err = run(capsys, "img", "check", "-r", "everything", img)
    assert rc == 1 and "qcrash: error: " in err and "invalid choice: 'everything'" in err
    rc, _, err = run(capsys, "io")
    assert rc == 1 and "qcrash: error: qcrash io: the following arguments are required: FILE" in err
    rc, _, err = run(capsys, "img", "create", "-o")
    assert rc == 1 and "qcrash: error: qcrash img create: argument -o: expected one argument" in err


def test_img_without_subcommand_prints_its_help(capsys):
    rc, out, err = run(capsys, "img")
    assert rc == 1 and "create" in err and "check" in err


def test_io_without_commands_opens_and_closes(capsys, img, monkeypatch):
    """Like `qemu-io FILE` at EOF of its prompt: open (repairing a dirty image), close cleanly."""
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write 0 512", "-c", "abort", img)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    rc, out, err = run(capsys, "io", img)
    assert rc == 0 and out == "" and "Rebuilding refcount structure" in err
    assert not dirty_bit(img)


# --------------------------------------------------------------------------- img check
def test_check_clean_image(capsys, img):
    create(img, "128M")
    rc, out, err = run(capsys, "img", "check", img)
    assert (rc, err) == (0, "")
    assert out == "No errors were found on the image.\nImage end offset: 262144\n"


def test_check_dirty_image_exit_2_split_output(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", img)
    rc, out, err = run(capsys, "img", "check", img)
    assert rc == 2
    assert err == ("ERROR cluster 5 refcount=0 reference=1\n"
                   "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0\n")
    assert out == ("\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may "
                   "corrupt it.\n1/2048 = 0.05% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
                   "Image end offset: 393216\n")
    rc, out, err = run(capsys, "img", "check", "--output", "json", img)
    assert rc == 2 and json.loads(out) == {"image-end-offset": 393216, "total-clusters": 2048, "corruptions": 2,
                                           "check-errors": 0, "allocated-clusters": 1, "filename": str(img),
                                           "format": "qcow2"}
    assert dirty_bit(img)


def test_check_repair_all(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", img)
    rc, out, err = run(capsys, "img", "check", "-r", "all", img)
    assert rc == 0
    assert lines(err) == ["ERROR cluster 5 refcount=0 reference=1", "Rebuilding refcount structure",
                          "Repairing cluster 1 refcount=1 reference=0", "Repairing cluster 2 refcount=1 reference=0"]
    assert out == ("The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n    1 corruptions\n\n"
                   "Double checking the fixed image now...\nNo errors were found on the image.\n"
                   "1/2048 = 0.05% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 524288\n")
    assert not dirty_bit(img)
    assert run(capsys, "io", "-r", "-c", "read -P 0x5a 0 512", img)[0] == 0


def test_check_repair_leaks_cannot_rebuild(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "abort", img)
    rc, out, err = run(capsys, "img", "check", "-r", "leaks", img)
    assert rc == 1 and out == ""
    assert lines(err) == ["ERROR cluster 5 refcount=0 reference=1", "ERROR need to rebuild refcount structures",
                          "qcrash: Check failed: Input/output error"]
    assert dirty_bit(img), "a failed repair must leave the image dirty"


def test_check_leak_exit_3_and_repair(capsys, img):
    create(img, "128M")
    run(capsys, "io", "-c", "write 0 512", img)
    data = bytearray(img.read_bytes())
    struct.pack_into(">Q", data, 0x40000, 0)  # drop the L2 entry: cluster 5 leaks
    img.write_bytes(bytes(data))
    rc, out, err = run(capsys, "img", "check", img)
    assert rc == 3 and err == "Leaked cluster 5 refcount=1 reference=0\n"
    assert "1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data." in out
    rc, out, err = run(capsys, "img", "check", "-r", "leaks", "--output=json", img)
    assert rc == 0 and json.loads(out)["leaks-fixed"] == 1
    assert err == "Leaked cluster 5 refcount=1 reference=0\nRepairing cluster 5 refcount=1 reference=0\n"
    assert run(capsys, "img", "check", img)[0] == 0


def test_check_open_errors(capsys, tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(100))
    rc, out, err = run(capsys, "img", "check", bad)
    assert rc == 1 and out == "" and err.startswith(f"qcrash: {bad} at offset 0x0: magic = 0x0")
    rc, out, err = run(capsys, "img", "check", tmp_path / "none.qcow2")
    assert rc == 1 and "Could not open" in err
