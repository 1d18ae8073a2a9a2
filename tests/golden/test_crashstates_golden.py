"""Data-driven golden tests for the fault layer and crash states, in Pebble's datadriven style.

Each file under crashstates/ is a scenario: blocks of commands, a ``----`` line, then the
expected output up to the next blank line. ``#`` lines are comments. State (the host file
and its log) carries over from block to block until ``reset``. Run with
``QCRASH_REWRITE=1`` to rewrite the expected output from what the code now prints (then
read the diff before committing it).

Commands:
    reset [size=N] [fill=X]              a fresh host file of N bytes of letter X (default zeros)
    write OFFSET LENGTH [fill=X] [site=S] a host write of LENGTH bytes of letter X (default: A, B, C, ... in turn)
    flush | truncate SIZE                host flush / truncate
    log                                  the recorded ops
    epoch [point=N]                      last flush, unsynced ops, durable size, sites at a point
    states [point=N] policy=P [k=K] [samples=S] [seed=X]
                                         count, then each state's id | image summary and size
    image ID                             the image of a hand-written state id (or the error)
    space [k=K] [samples=S] [policies=P,Q]   the crash-space report over all points

An image summary prints one character per 512-byte sector (a space every 8 sectors):
``.`` all zeros, a letter when the sector is all that letter, ``*`` a mix of letters (and
maybe zeros), ``!`` anything else (garbage).
"""

from __future__ import annotations

import difflib
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.crashstates import CrashImageBuilder, CrashState, count_states, enumerate_states, space_report
from harness.faultfile import FaultInjectingFile
from models.blockio import SECTOR
from models.blockio import MemoryFile, WriteSite

GOLDEN_DIR = Path(__file__).parent / "crashstates"
_LETTERS = frozenset(string.ascii_letters.encode())


def summarize(image: bytes | bytearray) -> str:
    chars = []
    for i, lo in enumerate(range(0, len(image), SECTOR)):
        chunk = bytes(image[lo : lo + SECTOR])
        values = set(chunk)
        if values == {0}:
            c = "."
        elif len(values) == 1 and chunk[0] in _LETTERS:
            c = chr(chunk[0])
        elif values <= _LETTERS | {0}:
            c = "*"
        else:
            c = "!"
        chars.append((" " if i and i % 8 == 0 else "") + c)
    return "".join(chars) or "(empty)"


@dataclass
class Scenario:
    file: FaultInjectingFile = field(default_factory=lambda: FaultInjectingFile(MemoryFile()))
    builder: CrashImageBuilder | None = None
    next_letter: int = 0

    def reset(self, size: int, fill: str) -> None:
        content = bytes(size) if fill == "." else fill.encode() * size
        self.file = FaultInjectingFile(MemoryFile(content))
        self.builder = None
        self.next_letter = 0

    def build(self, state: CrashState) -> bytearray:
        if self.builder is None or self.builder.log is not self.file.log:
            self.builder = CrashImageBuilder(self.file.log)
        return self.builder.build(state)


def _split_args(words: list[str]) -> tuple[list[str], dict[str, str]]:
    positional = [w for w in words if "=" not in w]
    named = dict(w.split("=", 1) for w in words if "=" in w)
    return positional, named


def run_command(sc: Scenario, line: str) -> list[str]:
    cmd, _, rest = line.partition(" ")
    if cmd == "image":
        try:
            state = CrashState.parse(rest)
            image = sc.build(state)
        except ValueError as e:
            return [f"error: {e}"]
        return [f"{state.id} | {summarize(image)} {len(image)}"]
    positional, named = _split_args(rest.split())
    log = sc.file.log
    if cmd == "reset":
        sc.reset(int(named.get("size", 0)), named.get("fill", "."))
        return []
    if cmd == "write":
        offset, length = map(int, positional)
        if "fill" in named:
            letter = named["fill"]
        else:
            letter = string.ascii_uppercase[sc.next_letter % 26]
            sc.next_letter += 1
        sc.file.pwrite(offset, letter.encode() * length, WriteSite(named.get("site", "other")))
        return []
    if cmd == "flush":
        sc.file.flush()
        return []
    if cmd == "truncate":
        sc.file.truncate(int(positional[0]))
        return []
    if cmd == "log":
        return [str(op) for op in log] or ["(no ops)"]
    if cmd == "epoch":
        point = int(named.get("point", len(log)))
        unsynced = ",".join(str(op.index) for op in log.unsynced(point)) or "none"
        sites = ",".join(log.sites_at(point)) or "none"
        return [
            f"point={point} last_flush={log.last_flush_before(point)} unsynced={unsynced} "
            f"durable_size={log.durable_size(point)} size={log.size_at(point)} sites={sites}"
        ]
    if cmd == "states":
        point = int(named.get("point", len(log)))
        policy = named["policy"]
        k = int(named.get("k", 8))
        samples = int(named.get("samples", 64))
        seed = int(named.get("seed", 0))
        states = enumerate_states(log, point, policy, k=k, seed=seed, samples=samples)
        out = [f"count={count_states(log, point, policy, k=k)} listed={len(states)}"]
        for s in states:
            image = sc.build(s)
            out.append(f"{s.id} | {summarize(image)} {len(image)}")
        return out
    if cmd == "space":
        kwargs = {"k": int(named.get("k", 8)), "samples": int(named.get("samples", 64))}
        if "policies" in named:
            kwargs["policies"] = named["policies"].split(",")
        return space_report(log, **kwargs).format().splitlines()
    raise ValueError(f"unknown golden command {cmd!r} in line {line!r}")


@dataclass
class Case:
    line: int  # 1-based line of the ---- separator
    commands: list[str]
    expected: list[str]
    output_at: int  # index into the file's lines where the expected output starts


def parse_golden(lines: list[str]) -> list[Case]:
    cases = []
    commands: list[str] = []
    i = 0
    while i < len(lines):
        text = lines[i]
        if text == "----":
            j = i + 1
            while j < len(lines) and lines[j].strip():
                j += 1
            if not commands:
                raise ValueError(f"line {i + 1}: '----' with no commands before it")
            cases.append(Case(i + 1, commands, lines[i + 1 : j], i + 1))
            commands = []
            i = j
            continue
        if text.strip() and not text.startswith("#"):
            commands.append(text.strip())
        i += 1
    if commands:
        raise ValueError(f"commands {commands!r} at the end of the file have no '----' and expected output")
    return cases


def run_file(path: Path) -> tuple[list[Case], list[list[str]]]:
    lines = path.read_text().splitlines()
    cases = parse_golden(lines)
    sc = Scenario()
    actual = []
    for case in cases:
        out: list[str] = []
        for command in case.commands:
            out += run_command(sc, command)
        actual.append(out)
    return cases, actual


def rewrite(path: Path, cases: list[Case], actual: list[list[str]]) -> None:
    lines = path.read_text().splitlines()
    for case, out in sorted(zip(cases, actual), key=lambda pair: -pair[0].output_at):
        lines[case.output_at : case.output_at + len(case.expected)] = out
    path.write_text("\n".join(lines) + "\n")


GOLDEN_FILES = sorted(GOLDEN_DIR.glob("*.txt"))


def test_golden_files_exist():
    assert len(GOLDEN_FILES) >= 5, f"expected the golden scenarios under {GOLDEN_DIR}"


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.name)
def test_golden(path: Path):
    cases, actual = run_file(path)
    if os.environ.get("QCRASH_REWRITE") == "1":
        rewrite(path, cases, actual)
        return
    failures = []
    for case, out in zip(cases, actual):
        if out != case.expected:
            diff = "\n".join(difflib.unified_diff(case.expected, out, "expected", "actual", lineterm=""))
            failures.append(f"{path.name}:{case.line}: {case.commands}\n{diff}")
    assert not failures, "\n\n".join(failures) + "\n\n(QCRASH_REWRITE=1 rewrites the expected output)"


def test_golden_parser_reads_blocks():
    lines = ["# c", "write 0 512", "flush", "----", "x", "y", "", "log", "----", ""]
    cases = parse_golden(lines)
    assert [(c.commands, c.expected) for c in cases] == [(["write 0 512", "flush"], ["x", "y"]), (["log"], [])]
    with pytest.raises(ValueError, match="no '----'"):
        parse_golden(["log"])


def test_summary_characters():
    assert summarize(b"A" * 512 + bytes(512) + b"A" * 256 + b"B" * 256 + b"\xff" * 10) == "A.*!"
    assert summarize(b"") == "(empty)"
