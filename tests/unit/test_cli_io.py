"""`qcrash io` (the qemu-io work-alike) run in-process: output and timing lines, patterns, crashes by abort/sigraise, cache modes, lazy refcounts and reopen, repair on open, and a `qcrash: <message>` line for every error."""

from __future__ import annotations

import io
import re
import struct

import pytest

from tests.unit._cli_img_tools import TIMING, create, dirty_bit, lines, run


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
    # As qemu-io: the image is marked corrupt on the first use (a fatal corruption event).
    assert err == ("qcow2: Marking image as corrupt: L2 table offset 0x40200 unaligned (L1 index: 0); "
                   "further corruption events will be suppressed\n"
                   f"qcrash: read failed: {img} at offset 0x30000: L1[0] = 0x8000000000040200: L2 table offset 0x40200 "
                   "not aligned to cluster size 0x10000\n")


def test_io_without_commands_opens_and_closes(capsys, img, monkeypatch):
    """Like `qemu-io FILE` at EOF of its prompt: open (repairing a dirty image), close cleanly."""
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write 0 512", "-c", "abort", img)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    rc, out, err = run(capsys, "io", img)
    assert rc == 0 and out == "" and "Rebuilding refcount structure" in err
    assert not dirty_bit(img)
