"""`qcrash fuzz-images`: the seeded malformed-image fuzzer (library, CLI and QEMU side by side)."""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

from harness.cli import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuzz-images", help="mutate valid images into hostile ones; classify every outcome")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--time", help="time budget, e.g. 90s, 10m")
    budget.add_argument("--cases", type=int, help="number of cases (default 1000 when --time is not given)")
    p.add_argument("--seed", type=int, default=1, help="run seed: the same seed gives the same cases (default 1)")
    p.add_argument("--qemu-every", type=int, default=50, help="compare with qemu-img/qemu-io every N cases (0: never)")
    p.add_argument("--cli-every", type=int, default=100, help="run qcrash's own CLI every N cases (0: never)")
    p.add_argument("--time-limit", type=float, default=2.0, help="seconds per step before it counts as over time")
    p.add_argument("--mem-limit", default="2048", help="address-space cap in MiB (MemoryError counts as over memory)")
    p.add_argument("--out", default=None, help="report directory (default reports/fuzz-images-<UTC>-<seed>)")
    p.add_argument("--corpus", default=None, help="where shrunk findings go (default <out>/findings)")
    p.set_defaults(func=cmd_fuzz_images)


def cmd_fuzz_images(args: argparse.Namespace) -> int:
    from harness.cli.fuzz import parse_duration
    from harness.fuzz import imagerun
    from harness.fuzz.report import utc_stamp

    seconds = parse_duration(args.time) if args.time else None
    cases = args.cases if args.cases is not None else (None if seconds else 1000)
    if cases is not None and cases < 0:
        raise UsageError(f"--cases {cases}: must not be negative")
    try:
        cap = int(args.mem_limit) << 20
    except ValueError:
        raise UsageError(f"--mem-limit {args.mem_limit!r}: a whole number of MiB") from None
    if cap > 0:
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = Path(args.out) if args.out else Path("reports") / f"fuzz-images-{utc_stamp()}-{args.seed}"
    corpus = Path(args.corpus) if args.corpus else out / "findings"
    print(f"qcrash fuzz-images: seed {args.seed}, " + (f"{cases} cases" if cases is not None else f"{seconds:g}s"),
          flush=True)

    def progress(s):
        bad = sum(s.classes.get(c, 0) for c in ("unexpected", "over-time", "over-memory", "read-only-write"))
        print(f"  {s.cases} cases, {bad} failing steps, {len(s.disagreements)} kinds of QEMU disagreement", flush=True)

    summary = imagerun.run(args.seed, cases=cases, seconds=seconds, qemu_every=args.qemu_every,
                           cli_every=args.cli_every, corpus=corpus, time_limit=args.time_limit, progress=progress)
    imagerun.write_report(summary, out)
    print(imagerun.format_summary(summary))
    print(f"report: {out}/summary.md")
    return 1 if summary.failures else 0
