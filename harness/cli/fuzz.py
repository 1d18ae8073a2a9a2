"""The fuzzing commands: `qcrash fuzz`, `replay`, `shrink` and `report merge`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from harness.cli import EXIT_CODES, UsageError, common_options
from harness import profiles
from harness.cli.options import parse_bugs, parse_duration, parse_int, parse_overrides, parse_shard
from harness.targets.qemu import spec as target_args

_RAW = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuzz", help="run seeded crash-consistency examples (the main job)", epilog=EXIT_CODES,
                       formatter_class=_RAW, description="Run seeded examples; write each finding as a shrunk "
                       "reproducer the moment it is made, and a report (summary.json, summary.md, plots) at the end.")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--time", help="time budget, a hard limit that includes shrinking: 90s, 10m, 1h30m, 8h")
    budget.add_argument("--examples", help="number of examples (default 24 when --time is not given)")
    p.add_argument("-x", "--exitfirst", action="store_true", help="stop after the first new finding (--max-findings 1)")
    p.add_argument("--max-findings", metavar="N", help="stop after N distinct new findings")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: random, printed and recorded)")
    p.add_argument("--jobs", default="1", help="worker processes, or 'auto' for every core")
    p.add_argument("--shard", default="0/1", help="I/N: take examples I, I+N, ... of the seed space; 'auto' reads "
                   "GitLab's CI_NODE_INDEX/CI_NODE_TOTAL, CircleCI's or Buildkite's parallel-job variables; "
                   "'auto/N' reads a Kubernetes indexed Job's JOB_COMPLETION_INDEX")
    p.add_argument("--profile", choices=profiles.NAMES, default=None,
                   help="sequence length and sweep depth (default: ci when CI=true, else dev)")
    p.add_argument("--config", default="", help="pin configuration keys: K=V,... (version, cluster_size, "
                   "refcount_bits, lazy_refcounts, cache_mode, virtual_size)")
    p.add_argument("--report", default=None, help="report directory (default reports/<UTC time>-<seed>)")
    p.add_argument("--corpus", default=None, help="where reproducer files go (default <report>/findings)")
    p.add_argument("--no-shrink", action="store_true", help="record findings without shrinking them")
    p.add_argument("--error-examples", metavar="F", default=None,
                   help="fraction 0..1 of examples whose host I/O error points are swept too (default: the "
                        "profile's: 0 for dev and ci, 0.25 for nightly)")
    p.add_argument("--known", action="append", default=[], metavar="DIR",
                   help="a shared, read-only directory of known failures: replayed first; hits of a known "
                        "signature are counted, not recorded again (repeatable)")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML: one test case per finding signature "
                   "and one for the run")
    common_options(p)
    target_args.add_arguments(p)
    p.set_defaults(func=cmd_fuzz)

    p = sub.add_parser("replay", help="re-run reproducer files without Hypothesis", epilog=EXIT_CODES,
                       formatter_class=_RAW)
    p.add_argument("files", nargs="+", metavar="FILE", help="reproducer files (.json)")
    common_options(p)  # --inject here replaces the bugs recorded in each file
    target_args.add_arguments(p, default=None)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("shrink", help="minimise a reproducer further; writes FILE.min.json beside it",
                       epilog=EXIT_CODES, formatter_class=_RAW)
    p.add_argument("file", metavar="FILE", help="a reproducer file (.json)")
    p.add_argument("--time", default="60s", help="how long to try (default 60s)")
    common_options(p)
    target_args.add_arguments(p, default=None)
    p.set_defaults(func=cmd_shrink)

    p = sub.add_parser("report", help="work with run reports")
    rsub = p.add_subparsers(dest="report_command", metavar="SUBCOMMAND", help="merge")
    m = rsub.add_parser("merge", help="merge shard reports into one (refuses shards of different runs)",
                        epilog=EXIT_CODES, formatter_class=_RAW)
    m.add_argument("dirs", nargs="+", metavar="DIR", help="shard report directories (each with summary.json)")
    m.add_argument("--out", default=None, help="merged report directory (default reports/merged-<UTC time>)")
    m.add_argument("--force", action="store_true", help="merge despite mismatched seeds, profiles, targets, bugs or "
                   "shard sets (the merged report says so)")
    m.set_defaults(func=cmd_report_merge)
    p.set_defaults(func=lambda _args: p.print_help(sys.stderr) or 2)


def _fuzz_options(args: argparse.Namespace):
    from harness.config import ConfigError
    from harness.fuzz import engine as fz
    from harness.fuzz import report as rp
    from models.qcow2 import inject

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    profile = args.profile or profiles.default_name()
    jobs = fz.default_jobs() if args.jobs == "auto" else parse_int("--jobs", args.jobs, 1, auto=True)
    seconds = parse_duration(args.time) if args.time else None
    examples = parse_int("--examples", args.examples, 1) if args.examples is not None else (None if seconds else 24)
    limit = 1 if args.exitfirst else (parse_int("--max-findings", args.max_findings, 1) if args.max_findings else None)
    overrides = parse_overrides(args.config)
    try:
        import random

        from harness.config import draw_config

        draw_config(random.Random(0)).pinned(overrides)  # validate early
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    shard = parse_shard(args.shard)
    suffix = f"-shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""
    report_dir = Path(args.report) if args.report else Path("reports") / f"{rp.utc_stamp()}-{seed}{suffix}"
    corpus = Path(args.corpus) if args.corpus else report_dir / "findings"
    spec = _target(args)
    opts = fz.FuzzOptions(examples=examples, seconds=seconds, seed=seed, jobs=jobs, shard=shard, profile=profile,
                          overrides=overrides, corpus=corpus, inject=sorted(inject.active()), shrink=not args.no_shrink,
                          stop_after_findings=limit, target=spec.name, target_spec=spec,
                          error_examples=_fraction("--error-examples", getattr(args, "error_examples", None)))
    return opts, report_dir


def _fraction(option: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{option} {text}: must be a fraction from 0 to 1")
    return value


def cmd_fuzz(args: argparse.Namespace) -> int:
    from harness.fuzz import engine as fz
    from harness.fuzz import report as rp
    from harness.fuzz.progress import Progress

    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    opts, report_dir = _fuzz_options(args)
    if args.junit:
        Path(args.junit).parent.mkdir(parents=True, exist_ok=True)
    opts.known = _known_signatures(args.known + target_args.known_dirs(opts.target_spec), quiet, args)
    print(f"qcrash fuzz: target {opts.target}"
          f"{f' {opts.target_spec.version}' if opts.target_spec and opts.target_spec.version else ''}, "
          f"seed {opts.seed}, shard {opts.shard[0]}/{opts.shard[1]}, profile {opts.profile}, "
          f"jobs {opts.jobs}, {f'{opts.examples} examples' if opts.examples is not None else f'{opts.seconds:g}s'}"
          + (f", injected bugs: {','.join(opts.inject)}" if opts.inject else ""), flush=True)

    def on_outcome(out) -> None:
        if verbose:
            print(f"example {out.index} (seed {out.example_seed}): {out.ops} ops, {out.stats.crash_states} crash "
                  f"states, {out.seconds:.2f}s{'' if out.finding is None else ': ' + out.finding.signature()}",
                  flush=True)
        if out.finding is not None and out.new:
            rep = out.reproducer
            path = opts.corpus / _file_name(rep)
            shrunk = "not shrunk (cut short by the budget)" if out.shrink_cut else \
                f"shrunk to {fz.describe_reproducer(rep)}"
            print(f"\nFINDING in example {out.index} (seed {out.example_seed}): {out.finding}\n"
                  f"  {shrunk}; replay: qcrash replay {path}", flush=True)

    progress = None if quiet else Progress(opts.examples, opts.seconds).start()
    result = fz.fuzz(opts, on_outcome=on_outcome, progress=progress)
    summary = rp.build_summary(result, opts, argv=sys.argv, report_dir=report_dir)
    rp.write_report(report_dir, summary)
    if args.junit:
        from harness.fuzz import junit

        junit.write(Path(args.junit), summary)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as out:
            out.write(rp.render_markdown(summary, for_step_summary=True))
    stopped = {signal.SIGINT: " (interrupted by SIGINT)", signal.SIGTERM: " (stopped by SIGTERM)"}
    print(f"{summary['examples']} examples, {summary['ops']} ops, {summary['crash_states']} crash states "
          f"({summary['timing']['crash_states_per_second']}/s), {len(result.findings)} distinct findings"
          + stopped.get(result.signal, " (interrupted)" if result.interrupted else ""))
    for f in summary["findings"]:
        print(f"  {f['signature']} x{f['count']}: {report_dir / f['file']}")
    print(f"report: {report_dir}/summary.md (seed {opts.seed})")
    if result.signal is not None:
        return 128 + int(result.signal)
    return 1 if result.findings else 0


def _file_name(rep) -> str:
    from harness.fuzz.corpus import file_name

    return file_name(rep)


def _target(args: argparse.Namespace, recorded=None):
    """The target spec the command line names (the reproducer's when it names none); exit 2 when QEMU is missing."""
    from harness.targets.qemu.binaries import QemuMissing

    try:
        return target_args.from_args(args, recorded)
    except (QemuMissing, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _known_signatures(dirs: list[str], quiet: bool = False, args: argparse.Namespace | None = None) -> dict[str, str]:
    """Replay every reproducer in the shared directories; the signatures still failing are known (-> their file)."""
    known: dict[str, str] = {}
    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            raise UsageError(f"--known {d}: not a directory")
        for f in sorted(path.glob("*.json")):
            verdict, detail, sig = replay_file(str(f), None, args)
            if sig is not None:
                known.setdefault(sig, str(f))
            if verdict == "error":
                print(f"qcrash: error: --known: {detail}", file=sys.stderr)
            elif not quiet:
                print(f"known: {detail.splitlines()[0]}", flush=True)
    return known


def replay_file(path: str, bugs: list[str] | None = None,
                args: argparse.Namespace | None = None) -> tuple[str, str, str | None]:
    """('failing'|'fixed'|'error', detail, signature of the finding now) for one reproducer file.

    It runs on the target the file names, unless `args` (--target, --qemu-img, --qemu-io) say otherwise.
    """
    from harness.fuzz.corpus import ReproducerError, load
    from harness.runner import Runner
    from harness.targets.qemu.spec import make, release, spec_of
    from models.qcow2 import inject

    try:
        rep = load(path)
    except ReproducerError as exc:
        return "error", str(exc), None
    previous = inject.active()
    runner = None
    try:
        recorded = spec_of(rep.target, rep.qemu)
        spec = target_args.from_args(args, recorded) if args is not None else recorded.resolved()
        inject.set_active(rep.inject if bugs is None else bugs)
        if rep.errors is not None:  # an error-point finding replays through its failed host operation
            from harness.errorpoints import replay

            findings = [f for f in [replay(rep.config, rep.ops, rep.errors)] if f is not None]
        else:
            runner = Runner(rep.config, seed=rep.seed, budget=rep.budget, target=make(spec))
            findings = runner.run(rep.ops)
    except Exception as exc:  # noqa: BLE001 - QEMU missing included: this file cannot be replayed here
        return "error", f"{path}: replay raised {type(exc).__name__}: {exc}", None
    finally:
        inject.set_active(previous)
        if runner is not None:
            release(getattr(runner, "target", None))
    if not findings:
        return "fixed", f"{path}: fixed (no finding; was {rep.signature})", None
    f = findings[0]
    same = rep.finding is None or f.signature() == rep.signature
    return "failing", (f"{path}: still failing{'' if same else ' (a different failure)'}: {f}\n"
                       f"  signature {f.signature()} (recorded {rep.signature})"), f.signature()


def cmd_replay(args: argparse.Namespace) -> int:
    # 1 when any file still fails; else 2 when any file could not be read; else 0.
    bugs = parse_bugs(args.inject, "--inject") if getattr(args, "inject", None) is not None else None
    seen = set()
    for path in args.files:
        verdict, detail, _sig = replay_file(path, bugs, args)
        if verdict == "error":
            print(f"qcrash: error: {detail}", file=sys.stderr, flush=True)
        else:
            print(detail, flush=True)
        seen.add(verdict)
    return 1 if "failing" in seen else 2 if "error" in seen else 0


def cmd_shrink(args: argparse.Namespace) -> int:
    from harness.fuzz import corpus as cp
    from harness.fuzz import engine as fz
    from harness.fuzz import evidence
    from harness.runner import Runner
    from harness.targets.qemu.spec import detail_of, make, release, spec_of
    from models.qcow2 import inject

    seconds = parse_duration(args.time)
    try:
        rep = cp.load(args.file)
    except cp.ReproducerError as exc:
        print(f"qcrash: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "inject", None) is not None:
        rep.inject = parse_bugs(args.inject, "--inject")
    inject.set_active(rep.inject)
    spec = _target(args, spec_of(rep.target, rep.qemu))
    rep.target, rep.qemu = spec.name, detail_of(spec)
    if rep.errors is not None:  # an error-point finding replays through its failed host operation
        from harness.errorpoints import replay

        findings = [f for f in [replay(rep.config, rep.ops, rep.errors)] if f is not None]
    else:
        runner = Runner(rep.config, seed=rep.seed, budget=rep.budget, target=make(spec))
        try:
            findings = runner.run(rep.ops)
        finally:
            release(getattr(runner, "target", None))
    if not findings:
        print(f"{args.file}: does not fail any more; nothing to shrink")
        return 0
    if findings[0].signature() != rep.signature:
        print(f"{args.file}: now fails as {findings[0].signature()} (recorded {rep.signature}); shrinking that")
    rep.finding = findings[0]
    small = fz.shrink_reproducer(rep, seconds)
    out = Path(args.file).with_suffix(".min.json")
    cp.save(out, small, evidence.gather(small))
    print(f"{args.file}: {len(rep.ops)} -> {len(small.ops)} operations, signature {small.signature}; wrote {out}")
    print(small.python())
    return 1


def cmd_report_merge(args: argparse.Namespace) -> int:
    from harness.fuzz import merge as mg
    from harness.fuzz import report as rp

    out = Path(args.out) if args.out else Path("reports") / f"merged-{rp.utc_stamp()}"
    try:
        merged = mg.merge([Path(d) for d in args.dirs], out, force=args.force)
    except mg.MergeError as exc:
        raise UsageError(str(exc)) from None
    for problem in merged.get("merge_problems", []):
        print(f"qcrash: warning: merged despite: {problem}", file=sys.stderr)
    print(f"merged {len(args.dirs)} reports ({merged['shard_label']}): {merged['examples']} examples, "
          f"{merged['crash_states']} crash states, {len(merged['findings'])} distinct findings -> {out}/summary.md")
    return 0
