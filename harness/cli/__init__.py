"""The qcrash command line: one dispatcher; each family of subcommands lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

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
}


class UsageError(Exception):
    """Bad command-line usage: exit status 2 with the message."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcrash", description="Crash-consistency fuzzing for qcow2 and lazy refcounts")
    parser.add_argument("--inject", default=None, metavar="BUG[,BUG...]",
                        help="switch on named bugs in models/qcow2 (also QCRASH_INJECT); see `qcrash zoo --list`")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in _FAMILIES else None)
    args = parser.parse_args(argv)
    if args.inject is not None:
        from models.qcow2 import inject

        try:
            inject.set_active(args.inject)
        except ValueError as exc:
            parser.error(str(exc))
    if not getattr(args, "func", None):
        if args.command is None:
            # No arguments: the main job, a short fuzz run on the in-memory default.
            parser = build_parser("fuzz")
            args = parser.parse_args(["fuzz"])
        else:
            parser.print_help()
            return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"qcrash: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
