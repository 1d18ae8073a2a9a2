"""The size parser (harness/sizes.py) against qemu-img on the same strings: the same accepted, the same refused, the same value."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.sizes import SizeError, parse_size

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")]

STRINGS = ["512", "0", "1 k", "1k", "1K", "1M", "64M", "1G", "1.5M", "0.5k", "1.25k", "1.k", "1b", "1B", "100b", "0x200",
           "0X1000", "0x200k", "+1k", " 1M", "00512", "1T",
           "1.5", "12Q", "1e3", "-1", "", "1M ", ".5M", "1kb", "1Mi", "0x1.8k", "abc", "8E",
           "100000000000000000000"]


def qemu_size(text: str, tmp: Path) -> int | None:
    """What qemu-img makes of a size: the raw file's length (rounded up to 512 bytes), or None when it refuses."""
    path = tmp / "s.raw"
    path.unlink(missing_ok=True)
    proc = subprocess.run(["qemu-img", "create", "-f", "raw", str(path), text], capture_output=True, text=True,
                          timeout=60)
    return path.stat().st_size if proc.returncode == 0 else None


@pytest.mark.parametrize("text", STRINGS, ids=lambda t: repr(t))
def test_size_parser_agrees_with_qemu_img(text: str, tmp_path: Path) -> None:
    theirs = qemu_size(text, tmp_path)
    try:
        mine = parse_size(text)
    except SizeError:
        mine = None
    rounded = None if mine is None else -(-mine // 512) * 512
    assert rounded == theirs, f"{text!r}: qcrash {mine}, qemu-img {theirs}"
