"""Size and rate text of the qemu-img/qemu-io work-alike: parse_size, size_to_str, qemu-io's cvtstr and its report line."""

from __future__ import annotations

import re

import pytest

from harness.cli import UsageError
from harness.cli import img as cli_img
from harness.cli import io as cli_io
from tests.unit._cli_img_tools import TIMING, MiB


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
