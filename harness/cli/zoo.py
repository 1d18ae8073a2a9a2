"""The measuring commands: `qcrash zoo` (bug detection) and `qcrash bench` (speed and cost)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import profiles
from harness.cli import EXIT_CODES, UsageError, common_options
from harness.cli.options import parse_bugs, parse_duration, parse_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="fuzz against each injected bug; table of time to detection", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="60s", help="time per bug, e.g. 60s, 5m (default 60s)")
    p.add_argument("--bugs", default="", help="comma-separated bug names to hunt (default: all; --inject does the same)")
    p.add_argument("--jobs", default="1", help="bugs hunted in parallel, or 'auto'")
    p.add_argument("--seed", type=int, default=1, help="run seed (default 1)")
    p.add_argument("--profile", choices=profiles.NAMES, default="dev", help="sweep depth (default dev)")
    p.add_argument("--list", action="store_true", help="print the bug names and what each stands for")
    p.add_argument("--out", default=None, help="report directory (default reports/zoo-<UTC time>)")
    common_options(p)
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("bench", help="throughput, cost per write against qemu-img bench, memory", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (under 5 minutes)")
    p.add_argument("--out", default=None, help="report directory (default reports/bench-<UTC time>)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="an older checkout (git worktree add DIR COMMIT): judging measured on both, side by side, with ratios")
    p.add_argument("--baseline-python", default=None, metavar="PATH",
                   help="run the baseline's judging cells with this interpreter (without --baseline: this "
                        "checkout under both interpreters, side by side)")
    p.add_argument("--judging-only", action="store_true", help="only the crash-states-per-second figures")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run each judging cell N times per checkout, alternating, and report the median round "
                        "(a dev cell varies by about 15%% between runs; default 1)")
    common_options(p)  # --inject: measure with these bugs switched on
    p.add_argument("--target", choices=("python", "qemu"), default=None,
                   help="instead: crash states judged per second (per core) on this target beside the python target")
    p.add_argument("--seconds", type=float, default=60.0, help="with --target: seconds per target (default 60)")
    p.add_argument("--qemu-img", default=None, metavar="PATH", help="with --target qemu: qemu-img binary or directory")
    p.add_argument("--qemu-io", default=None, metavar="PATH", help="with --target qemu: qemu-io binary")
    p.set_defaults(func=cmd_bench)


def cmd_zoo(args: argparse.Namespace) -> int:
    from harness.fuzz import engine as fz
    from harness.fuzz import report as rp
    from harness.fuzz import zoo
    from harness.fuzz.zoo import BUGS  # crash-consistency and error-handling bugs

    if args.list:
        width = max(map(len, BUGS))
        for name, text in BUGS.items():
            print(f"{name:<{width}}  {text}")
        return 0
    bugs = (parse_bugs(args.bugs, "--bugs") or (parse_bugs(args.inject, "--inject") if args.inject else [])
            or list(BUGS))
    jobs = fz.default_jobs() if args.jobs == "auto" else parse_int("--jobs", args.jobs, 1, auto=True)
    seconds = parse_duration(args.budget, "--budget")
    out = Path(args.out) if args.out else Path("reports") / f"zoo-{rp.utc_stamp()}"
    print(f"qcrash zoo: {len(bugs)} bugs, {seconds:g}s each, seed {args.seed}, jobs {jobs}", flush=True)
    rows = zoo.run_zoo(bugs, seconds=seconds, seed=args.seed, jobs=jobs, profile=args.profile, out=out)
    print(zoo.format_rows(rows))
    detected = sum(r.detected for r in rows)
    print(f"{detected}/{len(rows)} detected; table: {out}/zoo.md")
    return 0 if detected == len(rows) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import os

    from harness.bench import throughput as bench
    from models.qcow2 import inject

    if inject.active():  # the benchmark's fuzz runs are subprocesses: they read the bugs from the environment
        os.environ["QCRASH_INJECT"] = ",".join(sorted(inject.active()))
    if args.target:
        from harness.targets.qemu.bench import compare_targets
        from harness.targets.qemu.binaries import QemuMissing

        try:
            path = compare_targets(args.target, seconds=args.seconds, qemu_img=args.qemu_img, qemu_io=args.qemu_io,
                                   out=Path(args.out) if args.out else None)
        except QemuMissing as exc:
            raise UsageError(str(exc)) from None
        print(f"bench: {path}")
        return 0

    baseline = Path(args.baseline) if args.baseline else None
    if args.baseline_python:
        import shutil

        from harness.bench.judging import interpreter_problem as judging_problem

        found = shutil.which(args.baseline_python)
        if found is None:
            print(f"qcrash bench: --baseline-python {args.baseline_python}: no such interpreter")
            return 2
        problem = judging_problem(found)
        if problem is not None:
            print(f"qcrash bench: --baseline-python {args.baseline_python}: cannot run a bench cell: {problem} "
                  "(it needs Python 3.11 and the project's dependencies: a venv made from it, with "
                  "`pip install -e .`, or an older checkout's .venv)")
            return 2
        args.baseline_python = found
        if baseline is None:
            baseline = Path(__file__).resolve().parents[2]  # this checkout, under the other interpreter
    if baseline is not None and not (baseline / "harness").is_dir():
        print(f"qcrash bench: --baseline {baseline}: not a qcrash checkout (no harness/ directory)")
        return 2
    if args.rounds < 1:
        print(f"qcrash bench: --rounds {args.rounds}: must be at least 1")
        return 2
    out = bench.run(quick=args.quick, out=Path(args.out) if args.out else None, baseline=baseline,
                    judging_only=args.judging_only, rounds=args.rounds, baseline_python=args.baseline_python,
                    progress=lambda line: print(line, flush=True))
    print(f"bench: {out}/bench.md")
    return 0
