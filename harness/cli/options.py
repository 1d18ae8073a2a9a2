"""Parsing the fuzz commands' option values: durations, shards (including `auto` from a CI's environment), --config pins, bug names."""

from __future__ import annotations

import os
import re
from typing import Mapping

from harness.cli import UsageError

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([dhms])")


def parse_duration(text: str, option: str = "--time") -> float:
    """Seconds in '90', '90s', '10m', '1.5h', '1h30m', '2d'; a zero or negative budget is a usage error."""
    t = text.strip().lower()
    if re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)", t):
        seconds = float(t)
    elif t and _PART.sub("", t) == "" and len(set(u for _n, u in _PART.findall(t))) == len(_PART.findall(t)):
        seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(t))
    else:
        raise UsageError(f"{option} {text!r}: not a duration (e.g. 90s, 10m, 1h30m, 8h)")
    if seconds <= 0:
        raise UsageError(f"{option} {text!r}: a time budget must be more than zero")
    return seconds


# CI systems that split one job into N parallel copies: (index variable, total variable, first index).
CI_SHARD_VARIABLES = (
    ("GitLab CI", "CI_NODE_INDEX", "CI_NODE_TOTAL", 1),  # `parallel: N`: 1..N
    ("CircleCI", "CIRCLE_NODE_INDEX", "CIRCLE_NODE_TOTAL", 0),  # `parallelism: N`: 0..N-1
    ("Buildkite", "BUILDKITE_PARALLEL_JOB", "BUILDKITE_PARALLEL_JOB_COUNT", 0),  # `parallelism: N`: 0..N-1
)


def parse_shard(text: str, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """'I/N'; 'auto' reads the CI's parallel-job variables; 'auto/N' takes Kubernetes' JOB_COMPLETION_INDEX with total N."""
    env = os.environ if env is None else env
    if text == "auto" or text.startswith("auto/"):
        return _auto_shard(text, env)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: must be I/N with whole numbers (e.g. 0/4), auto, or auto/N") from None
    return _checked(i, n, f"--shard {text!r}")


def _checked(i: int, n: int, what: str) -> tuple[int, int]:
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"{what}: needs 0 <= I < N (got I={i}, N={n})")
    return i, n


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"--shard auto: {name}={env[name]!r} is not a whole number") from None


def _auto_shard(text: str, env: Mapping[str, str]) -> tuple[int, int]:
    if text.startswith("auto/"):
        try:
            total = int(text[5:])
        except ValueError:
            raise UsageError(f"--shard {text!r}: the total after auto/ must be a whole number") from None
        if "JOB_COMPLETION_INDEX" not in env:
            raise UsageError(f"--shard {text}: JOB_COMPLETION_INDEX is not set (a Kubernetes indexed Job sets it)")
        return _checked(_int_env(env, "JOB_COMPLETION_INDEX"), total, f"--shard {text} (Kubernetes indexed Job)")
    for system, index, total, first in CI_SHARD_VARIABLES:
        if index in env and total in env:
            i, n = _int_env(env, index) - first, _int_env(env, total)
            return _checked(i, n, f"--shard auto ({system}: {index}={env[index]}, {total}={env[total]})")
    names = ", ".join(f"{i}/{t}" for _s, i, t, _f in CI_SHARD_VARIABLES)
    raise UsageError(f"--shard auto: no CI parallel-job variables found ({names}); "
                     f"for a Kubernetes indexed Job use --shard auto/N")


def parse_overrides(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        if "=" not in item:
            raise UsageError(f"--config {item!r}: must be K=V")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_bugs(text: str, option: str) -> list[str]:
    """Comma-separated injected-bug names; an unknown one is a usage error that lists the known names."""
    from models.qcow2.inject import BUGS, ERROR_BUGS

    known = BUGS.keys() | ERROR_BUGS.keys()  # error-handling bugs are found by error-point sweeps
    names = sorted({n.strip() for n in text.split(",") if n.strip()})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"{option}: unknown bug name(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return names


def parse_int(name: str, text: str, lo: int, *, auto: bool = False) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name} {text!r}: must be a whole number{' or auto' if auto else ''}") from None
    if value < lo:
        raise UsageError(f"{name} {value}: must be at least {lo}")
    return value
