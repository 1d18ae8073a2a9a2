"""Errors common to the qemu-img/qemu-io work-alike command line: internal errors and argparse errors are one `qcrash:` line, never a traceback."""

from __future__ import annotations

from harness.cli import img as cli_img
from tests.unit._cli_img_tools import create, run


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
