"""Behaviour digests: one hash per seeded example of what the runner did, to show that a refactor or a speed-up changed nothing.

Run ``python -m harness.bench.behaviour --profile dev --examples 50 --seed 7`` on two
checkouts (the old commit in a temporary directory, the new one here) and compare the
``overall`` lines. The digest covers what `tests/harness/test_runner.py`'s determinism
test covers (example seed, configuration, operations, crash-state counts by policy,
by write site, and the recovery situations reached) plus the verdict of any finding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time


def _run_example():
    try:
        from harness.fuzz.engine import run_example
    except ImportError:  # an older checkout, before harness/fuzz/ was a package
        from harness.fuzz import run_example  # type: ignore[no-redef]
    return run_example


def example_digest(outcome) -> str:
    """The digest of one example's outcome; equal digests mean the runner made the same choices and verdicts."""
    s = outcome.stats
    finding = outcome.finding
    obj = [outcome.example_seed, str(outcome.config), outcome.ops, s.crash_states, dict(s.by_policy),
           dict(s.by_site), dict(s.coverage), finding.verdict.value if finding else None]
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench.behaviour", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="dev")
    parser.add_argument("--examples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--config", action="append", default=[], metavar="K=V")
    args = parser.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in args.config)
    run_example = _run_example()
    digests = []
    t0 = time.perf_counter()
    for i in range(args.examples):
        out = run_example((i, args.seed, overrides, args.profile, [], False))
        digests.append(example_digest(out))
        print(f"example {i} seed {out.example_seed}: {digests[-1]} ({out.stats.crash_states} states, "
              f"{out.seconds:.2f}s)", flush=True)
    overall = hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
    print(f"overall {args.profile} seed={args.seed} examples={args.examples}: {overall} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
