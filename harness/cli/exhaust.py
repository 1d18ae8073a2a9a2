"""The `qcrash exhaust` command: bounded-exhaustive operation sequences with every crash state judged (harness.exhaust)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli import EXIT_CODES, UsageError, common_options
from harness.cli.options import parse_int, parse_overrides, parse_shard


def register(sub: argparse._SubParsersAction) -> None:
    from harness.exhaust import ALPHABETS

    choices = "; ".join(f"{name}: {text}" for name, (text, _f) in ALPHABETS.items())
    p = sub.add_parser("exhaust", help="every operation sequence up to N ops over a small alphabet, every crash state",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="3", help="longest sequence, in operations (default 3)")
    p.add_argument("--alphabet", choices=tuple(ALPHABETS), default="default", help=f"the operation alphabet ({choices})")
    p.add_argument("--config", default="", metavar="K=V[,K=V...]",
                   help="pin configuration axes (default: v3, lazy refcounts, writeback, 4 MiB, "
                        "one run per cluster size 512, 4096, 65536; pin cluster_size for one)")
    p.add_argument("--jobs", default="1", help="worker processes, or 'auto'")
    p.add_argument("--shard", default="0/1", help="run shard I of N (sequence indices I, I+N, ...)")
    p.add_argument("--first", action="store_true", help="stop at the first finding (a later run resumes)")
    p.add_argument("--deep", action="store_true", help="also crash every recovery (slower)")
    p.add_argument("--out", default=None, help="report directory; an unfinished run there is resumed "
                                               "(default reports/exhaust-<UTC time>)")
    common_options(p)
    p.set_defaults(func=cmd_exhaust)


def cmd_exhaust(args: argparse.Namespace) -> int:
    from harness import exhaust
    from harness.config import ConfigError
    from harness.fuzz import engine as fz
    from harness.fuzz import report as rp
    from models.qcow2 import inject

    n = parse_int("--ops", args.ops, 1)
    jobs = fz.default_jobs() if args.jobs == "auto" else parse_int("--jobs", args.jobs, 1, auto=True)
    try:
        configs = tuple(exhaust.config_classes(parse_overrides(args.config)))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    plan = exhaust.Plan(args.alphabet, configs, n, exhaust.DEEP_BUDGET if args.deep else exhaust.BUDGET,
                        tuple(sorted(inject.active())), parse_shard(args.shard))
    out = Path(args.out) if args.out else Path("reports") / f"exhaust-{rp.utc_stamp()}"
    quiet = getattr(args, "quiet", False)
    count = [0]

    def on_result(result) -> None:
        count[0] += 1
        if result.finding:
            print(f"finding: sequence #{result.index}: {result.finding['verdict']} at op #{result.finding['op_index']}",
                  flush=True)
        elif not quiet and count[0] % 50 == 0:
            print(f"  {count[0]} sequences run", file=sys.stderr, flush=True)

    try:
        summary = exhaust.run(plan, out, jobs=jobs, on_result=on_result, first=args.first)
    except exhaust.ExhaustError as exc:
        raise UsageError(str(exc)) from None
    print(f"exhaust: {summary['sequences']}/{summary['sequences_planned']} sequences, {summary['crash_states']} crash "
          f"states, {summary['sequences_with_findings']} with findings, {summary['sequence_seconds']} s; {out}/exhaust.md")
    return 1 if summary["sequences_with_findings"] else 0
