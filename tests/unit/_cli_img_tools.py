"""Helpers shared by the in-process tests of `qcrash img` and `qcrash io`: run a command line, create an image, read the dirty bit, and qemu-io's timing line."""

from __future__ import annotations

from harness.cli import main


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


def create(path, size="128M", *opts):
    args = ["img", "create", "-q"]
    for o in opts:
        args += ["-o", o]
    assert main(args + [str(path), size]) == 0


def dirty_bit(path) -> bool:
    return bool(path.read_bytes()[79] & 1)
