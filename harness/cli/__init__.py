"""The qcrash command line: one dispatcher; each family of subcommands lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from harness.errors import QcrashError

# subcommand -> module that provides `register(subparsers)`; imported lazily so that
# `qcrash img ...` does not pay for Hypothesis and the runner.
_FAMILIES = {
    "img": "harness.cli.img",
    "io": "harness.cli.img",
    "fuzz": "harness.cli.fuzz",
    "replay": "harness.cli.fuzz",
    "shrink": "harness.cli.fuzz",
    "report": "harness.cli.fuzz",
    "zoo": "harness.cli.zoo",
    "bench": "harness.cli.zoo",
    "fuzz-images": "harness.cli.hostile",
    "exhaust": "harness.cli.exhaust",
}

EXIT_CODES = """\
exit status:
  0    nothing found (fuzz, zoo: every bug detected; replay: fixed)
  1    findings (replay: still failing); for img/io, qemu-img's and qemu-io's statuses
       (1 for errors and usage errors; img check: 2 corruptions, 3 leaks)
  2    usage error, or a file that cannot be read
  130  fuzz stopped by SIGINT (Ctrl-C), after writing the partial report
  143  fuzz stopped by SIGTERM, after writing the partial report"""


class UsageError(QcrashError):
    """Bad command-line usage: exit status 2 with the message."""


def common_options(parser: argparse.ArgumentParser, *, inject: bool = True) -> None:
    """-q, -v and --inject, accepted after the subcommand too (SUPPRESS: given there, they override the global ones)."""
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress line; print only findings, errors and the closing summary")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also print one line per example")
    if inject:
        parser.add_argument("--inject", default=argparse.SUPPRESS, metavar="BUG[,BUG...]",
                            help="switch on named bugs in models/qcow2 (also QCRASH_INJECT); see `qcrash zoo --list`")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from harness import __version__

    parser = argparse.ArgumentParser(prog="qcrash", description="Crash-consistency fuzzing for qcow2 and lazy refcounts",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qcrash {__version__}", help="print the version")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line; only findings and the summary")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print one line per example")
    parser.add_argument("--inject", default=None, metavar="BUG[,BUG...]",
                        help="switch on named bugs in models/qcow2 (also QCRASH_INJECT); see `qcrash zoo --list`")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="the command to run (COMMAND --help for its options)")
    seen = set()
    for name, module in _FAMILIES.items():
        if module in seen or (only is not None and name != only):
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        seen.add(module)
        mod.register(sub)
    return parser


def _import_inject():
    """models.qcow2.inject reads QCRASH_INJECT when imported and raises on a typo: import it without, then check."""
    env = os.environ.pop("QCRASH_INJECT", None)
    try:
        from models.qcow2 import inject
    finally:
        if env is not None:
            os.environ["QCRASH_INJECT"] = env
    return inject, env


def _select_bugs(args: argparse.Namespace) -> None:
    """--inject (after or before the subcommand) wins over QCRASH_INJECT; unknown names are usage errors."""
    from harness.cli.options import parse_bugs

    inject, env = _import_inject()
    if args.inject is not None:
        inject.set_active(parse_bugs(args.inject, "--inject"))
    elif env:
        inject.set_active(parse_bugs(env, "QCRASH_INJECT"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _import_inject()  # before any module that imports the qcow2 model, so a QCRASH_INJECT typo is no traceback
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in _FAMILIES else None)
    if first in ("img", "io"):
        from harness.cli.img import _install_error

        _install_error(parser)  # qemu-img's and qemu-io's status for a usage error: 1
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        _select_bugs(args)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"qcrash: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `qcrash zoo --list | head`: the reader left; no traceback. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and exit as a shell reports SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
