"""The fuzzing commands: `qcrash fuzz`, `replay`, `shrink` and `report merge`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.cli import UsageError
from harness.targets.qemu import spec as target_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuzz", help="run seeded crash-consistency examples (the main job)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--time", help="time budget, e.g. 90s, 10m, 1h")
    budget.add_argument("--examples", type=int, help="number of examples (default 24 when --time is not given)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: random, printed and recorded)")
    p.add_argument("--jobs", default="1", help="worker processes, or 'auto' for every core")
    p.add_argument("--shard", default="0/1", help="I/N: take examples I, I+N, ... of the seed space")
    p.add_argument("--profile", choices=("dev", "ci", "nightly"), default=None,
                   help="sequence length and sweep depth (default: ci when CI=true, else dev)")
    p.add_argument("--config", default="", help="pin configuration keys: K=V,... (version, cluster_size, "
                   "refcount_bits, lazy_refcounts, cache_mode, virtual_size)")
    p.add_argument("--report", default=None, help="report directory (default reports/<UTC time>-<seed>)")
    p.add_argument("--corpus", default=None, help="where reproducer files go (default <report>/findings)")
    p.add_argument("--no-shrink", action="store_true", help="record findings without shrinking them")
    p.add_argument("--known", action="append", default=[], metavar="DIR",
                   help="a shared, read-only directory of known failures: replayed first; hits of a known "
                        "signature are counted, not recorded again (repeatable)")
    target_args.add_arguments(p)
    p.set_defaults(func=cmd_fuzz)

    p = sub.add_parser("replay", help="re-run reproducer files without Hypothesis")
    p.add_argument("files", nargs="+")
    target_args.add_arguments(p, default=None)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("shrink", help="minimise a reproducer further; writes FILE.min.json beside it")
    p.add_argument("file")
    p.add_argument("--seconds", type=float, default=60.0)
    target_args.add_arguments(p, default=None)
    p.set_defaults(func=cmd_shrink)

    p = sub.add_parser("report", help="work with run reports")
    rsub = p.add_subparsers(dest="report_command", metavar="SUBCOMMAND")
    m = rsub.add_parser("merge", help="merge shard reports into one")
    m.add_argument("dirs", nargs="+")
    m.add_argument("--out", default=None)
    m.set_defaults(func=cmd_report_merge)


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        if t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except (ValueError, IndexError):
        raise UsageError(f"--time {text!r}: not a duration (e.g. 90s, 10m, 1h)") from None


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: must be I/N with whole numbers, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: needs 0 <= I < N")
    return i, n


def _parse_overrides(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        if "=" not in item:
            raise UsageError(f"--config {item!r}: must be K=V")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_fuzz(args: argparse.Namespace) -> int:
    from harness.fuzz import engine as fz
    from harness.fuzz import report as rp
    from harness.config import ConfigError, draw_config
    from harness.fuzz.corpus import file_name
    from models.qcow2 import inject

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    profile = args.profile or ("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev")
    jobs = fz.default_jobs() if args.jobs == "auto" else _int_arg("--jobs", args.jobs, 1)
    seconds = parse_duration(args.time) if args.time else None
    examples = args.examples if args.examples is not None else (None if seconds else 24)
    if examples is not None and examples < 0:
        raise UsageError("--examples must be at least 0")
    overrides = _parse_overrides(args.config)
    try:
        import random

        fz._override(draw_config(random.Random(0)), overrides, random.Random(0))  # validate early
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    shard = _parse_shard(args.shard)
    suffix = f"-shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""
    report_dir = Path(args.report) if args.report else Path("reports") / f"{rp.utc_stamp()}-{seed}{suffix}"
    corpus = Path(args.corpus) if args.corpus else report_dir / "findings"
    target = _target(args)
    known_dirs = args.known + target_args.known_dirs(target)
    opts = fz.FuzzOptions(examples=examples, seconds=seconds, seed=seed, jobs=jobs, shard=_parse_shard(args.shard),
                          profile=profile, overrides=overrides, corpus=corpus, inject=sorted(inject.active()),
                          shrink=not args.no_shrink, known=_known_signatures(known_dirs, args), target=target)
    print(f"qcrash fuzz: target {target.name}{f' {target.version}' if target.version else ''}, "
          f"seed {seed}, shard {opts.shard[0]}/{opts.shard[1]}, profile {profile}, jobs {jobs}, "
          f"{f'{examples} examples' if examples is not None else f'{seconds:g}s'}"
          + (f", injected bugs: {','.join(opts.inject)}" if opts.inject else ""), flush=True)

    def on_outcome(out) -> None:
        if out.finding is not None:
            rep = out.reproducer
            print(f"\nFINDING in example {out.index} (seed {out.example_seed}): {out.finding}", flush=True)
            print(f"  shrunk to {fz.describe_reproducer(rep)}; replay: qcrash replay {corpus}/{file_name(rep)}",
                  flush=True)

    result = fz.fuzz(opts, on_outcome=on_outcome, progress=fz.Progress(examples, seconds))
    summary = rp.build_summary(result, opts, argv=sys.argv)
    rp.write_report(report_dir, summary)
    print(f"{summary['examples']} examples, {summary['ops']} ops, {summary['crash_states']} crash states "
          f"({summary['timing']['crash_states_per_second']}/s), {len(result.findings)} distinct findings"
          + (" (interrupted)" if result.interrupted else ""))
    for f in summary["findings"]:
        print(f"  {f['signature']} x{f['count']}: {f['file']}")
    print(f"report: {report_dir}/summary.md (seed {seed})")
    return 1 if result.findings else 0


def _target(args: argparse.Namespace, recorded=None):
    """The target spec the command line names (the reproducer's when it names none); exit 2 when QEMU is missing."""
    from harness.targets.qemu.binaries import QemuMissing

    try:
        return target_args.from_args(args, recorded)
    except (QemuMissing, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _known_signatures(dirs: list[str], args: argparse.Namespace | None = None) -> set[str]:
    """Replay every reproducer in the shared directories; the signatures still failing are known."""
    known = set()
    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            raise UsageError(f"--known {d}: not a directory")
        for f in sorted(path.glob("*.json")):
            verdict, detail, sig = replay_file(str(f), args)
            if sig is not None:
                known.add(sig)
            print(f"known: {detail.splitlines()[0]}", flush=True)
    return known


def _int_arg(name: str, text: str, lo: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name} {text!r}: must be a whole number or 'auto'") from None
    if value < lo:
        raise UsageError(f"{name} {value}: must be at least {lo}")
    return value


def replay_file(path: str, args: argparse.Namespace | None = None) -> tuple[str, str, str | None]:
    """('failing'|'fixed'|'error', detail, signature of the finding now) for one reproducer file."""
    from harness.fuzz.corpus import ReproducerError, load
    from harness.runner import Runner
    from harness.targets.qemu.spec import make, release
    from models.qcow2 import inject

    try:
        rep = load(path)
    except ReproducerError as exc:
        return "error", str(exc), None
    try:
        spec = _target(args, rep.target) if args is not None else rep.target.resolved()
    except Exception as exc:  # noqa: BLE001 - QEMU missing: this file cannot be replayed here
        return "error", f"{path}: target {rep.target.name}: {exc}", None
    previous = inject.active()
    runner = None
    try:
        inject.set_active(rep.inject)
        runner = Runner(rep.config, seed=rep.seed, budget=rep.budget, target=make(spec))
        findings = runner.run(rep.ops)
    except Exception as exc:  # noqa: BLE001
        return "error", f"{path}: replay raised {type(exc).__name__}: {exc}", None
    finally:
        inject.set_active(previous)
        if runner is not None:
            release(runner.target)
    if not findings:
        return "fixed", f"{path}: fixed (no finding; was {rep.signature})", None
    f = findings[0]
    same = rep.finding is None or f.verdict == rep.finding.verdict
    return "failing", (f"{path}: still failing{'' if same else ' (different verdict)'}: {f}\n"
                       f"  signature {f.signature()} (recorded {rep.signature})"), f.signature()


def cmd_replay(args: argparse.Namespace) -> int:
    # 1 when any file still fails; else 2 when any file could not be read; else 0.
    seen = set()
    for path in args.files:
        verdict, detail, _sig = replay_file(path, args)
        print(detail, flush=True)
        seen.add(verdict)
    return 1 if "failing" in seen else 2 if "error" in seen else 0


def cmd_shrink(args: argparse.Namespace) -> int:
    from harness.fuzz import corpus as cp
    from harness.runner import Runner
    from harness.shrink import shrink
    from harness.targets.qemu.spec import make, release
    from models.qcow2 import inject

    try:
        rep = cp.load(args.file)
    except cp.ReproducerError as exc:
        print(f"qcrash: {exc}", file=sys.stderr)
        return 2
    inject.set_active(rep.inject)
    spec = _target(args, rep.target)
    runner = Runner(rep.config, seed=rep.seed, budget=rep.budget, target=make(spec))
    try:
        findings = runner.run(rep.ops)
    finally:
        release(runner.target)
    if not findings:
        print(f"{args.file}: does not fail any more; nothing to shrink")
        return 0
    ops, budget, finding = shrink(rep.config, rep.ops, rep.seed, rep.budget, findings[0], seconds=args.seconds,
                                  target=spec)
    small = cp.Reproducer(rep.config, ops, rep.seed, budget, finding, rep.example_seed, rep.inject, rep.count,
                          shrunk_from=len(rep.ops), target=spec)
    out = Path(args.file).with_suffix(".min.json")
    cp.atomic_write_json(out, small.to_dict())
    print(f"{args.file}: {len(rep.ops)} -> {len(ops)} operations; wrote {out}")
    print(small.python())
    return 1


def cmd_report_merge(args: argparse.Namespace) -> int:
    from harness.fuzz import report as rp

    out = Path(args.out) if args.out else Path("reports") / f"merged-{rp.utc_stamp()}"
    try:
        merged = rp.merge([Path(d) for d in args.dirs], out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"merged {len(args.dirs)} reports: {merged['examples']} examples, {merged['crash_states']} crash states, "
          f"{len(merged['findings'])} distinct findings -> {out}/summary.md")
    return 0
