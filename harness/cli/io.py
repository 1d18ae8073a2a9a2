"""`qcrash io`: qemu-io's commands over the pure-Python qcow2 model (the conventions are listed in harness/cli/img.py)."""

from __future__ import annotations

import argparse
import getopt
import shlex
import sys
import time
from dataclasses import dataclass

from harness.cli import UsageError
from harness.cli.img import (EXIT_ABORT, EXIT_KILLED, CommandFailed, _check_format, _err, _guard, _open_file, parse_bool,
                              parse_opts, parse_size)


# ---------------------------------------------------------------------------------- io
@dataclass
class IoCommand:
    """One parsed qemu-io command: name, offset/length, and its options."""

    text: str
    name: str
    offset: int = 0
    length: int = 0
    pattern: int | None = None
    pattern_offset: int = 0
    pattern_length: int | None = None
    zero: bool = False
    fua: bool = False
    quiet: bool = False
    lazy: bool | None = None
    cache: str | None = None
    signal: int = 0


_CACHE_MODES = ("writeback", "writethrough", "directsync")
_IO_HELP = {
    "write": "write [-fquz] [-P pattern] off len",
    "read": "read [-q] [-P pattern [-s off] [-l len]] off len",
    "discard": "discard [-q] off len",
    "flush": "flush",
    "abort": "abort",
    "sigraise": "sigraise 6|9",
    "reopen": "reopen [-c cache] [-o lazy-refcounts=on|off]",
}
_IO_SUPPORTED = {"write": "Pzqfu", "read": "Pqsl", "discard": "q", "reopen": "oc"}  # -u: accepted, no effect
_IO_UNSUPPORTED = {
    "b": "-b (vmstate)", "c": "-c (compressed)", "C": "-C (copy-on-read)", "n": "-n (no fallback)",
    "s": "-s (source file)", "a": "-a (aio)", "v": "-v (dump)", "r": "-r (read-only reopen)",
    "w": "-w (read-write reopen)",
}


def _cache_mode(text: str, what: str) -> str:
    if text not in _CACHE_MODES:
        if text in ("none", "off", "unsafe"):
            raise UsageError(f"{what} '{text}' is not supported by qcrash (use writeback, writethrough or directsync)")
        raise UsageError(f"{what} '{text}': invalid cache mode (use writeback, writethrough or directsync)")
    return text


def _lazy_option(text: str, what: str) -> bool:
    lazy: bool | None = None
    for key, value in parse_opts(text, what):
        if key != "lazy-refcounts":
            raise UsageError(f"{what} '{key}' is not supported (only lazy-refcounts=on|off)")
        lazy = parse_bool(value, f"{what} lazy-refcounts")
    if lazy is None:
        raise UsageError(f"{what} '{text}': expected lazy-refcounts=on|off")
    return lazy


def _pattern(text: str, cmd: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise UsageError(f"{cmd}: {text} is not a valid pattern byte (0..255)")
    return value


def parse_io_command(text: str) -> IoCommand:
    """Parse one qemu-io command string (its getopt flags) or raise UsageError naming the problem."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"command '{text}': {exc}") from None
    if not words:
        raise UsageError("empty command")
    name, rest = words[0], words[1:]
    if name not in _IO_HELP:
        raise UsageError(f"command \"{name}\" not found (qcrash io knows: {', '.join(_IO_HELP)})")
    spec = {"write": "bcCfnquzP:s:", "read": "abCqvP:s:l:", "discard": "Cq", "reopen": "rwc:o:"}.get(name, "")
    try:
        opts, positional = getopt.getopt(rest, spec)
    except getopt.GetoptError as exc:
        raise UsageError(f"{name}: {exc.msg}; usage: {_IO_HELP[name]}") from None
    cmd = IoCommand(text, name)
    for opt, value in opts:
        flag = opt[1]
        if flag not in _IO_SUPPORTED[name]:
            what = _IO_UNSUPPORTED.get(flag, f"-{flag}")
            raise UsageError(f"{name}: option {what} is not supported by qcrash; usage: {_IO_HELP[name]}")
        if flag == "P":
            cmd.pattern = _pattern(value, name)
        elif flag == "s":
            cmd.pattern_offset = parse_size(value, f"{name} -s")
        elif flag == "l":
            cmd.pattern_length = parse_size(value, f"{name} -l")
        elif flag == "z":
            cmd.zero = True
        elif flag == "f":
            cmd.fua = True
        elif flag == "q":
            cmd.quiet = True
        elif flag == "o":
            cmd.lazy = _lazy_option(value, "reopen -o")
        elif flag == "c":
            cmd.cache = _cache_mode(value, "reopen -c")
    if name == "write" and cmd.zero and cmd.pattern is not None:
        raise UsageError("write: -z and -P cannot be specified at the same time")
    if name in ("write", "read", "discard"):
        if len(positional) != 2:
            raise UsageError(f"{name}: expected an offset and a length; usage: {_IO_HELP[name]}")
        cmd.offset = parse_size(positional[0], f"{name} offset")
        cmd.length = parse_size(positional[1], f"{name} length")
        if name == "read" and cmd.pattern is not None:
            plen = cmd.length if cmd.pattern_length is None else cmd.pattern_length
            if cmd.pattern_offset + plen > cmd.length:
                raise UsageError(f"read: pattern range -s {cmd.pattern_offset} -l {plen} lies outside the "
                                 f"{cmd.length}-byte request")
    elif name == "sigraise":
        if len(positional) != 1 or positional[0] not in ("6", "9"):
            raise UsageError(f"sigraise: qcrash supports signals 6 (SIGABRT) and 9 (SIGKILL) only; usage: {_IO_HELP[name]}")
        cmd.signal = int(positional[0])
    elif positional:
        raise UsageError(f"{name}: unexpected argument(s) {' '.join(positional)}; usage: {_IO_HELP[name]}")
    if name == "reopen" and cmd.lazy is None and cmd.cache is None:
        raise UsageError(f"reopen: nothing to change; usage: {_IO_HELP[name]}")
    return cmd


def _cvtstr(value: float) -> str:
    """qemu-io's cvtstr: %.3f with a binary unit, or %f bytes; a trailing .000 is dropped."""
    for shift, suffix in ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB")):
        if value >= (1 << shift):
            text = "%.3f" % (value / (1 << shift))
            break
    else:
        text, suffix = "%f" % value, " bytes"
    cut = text.find(".000")
    return (text[:cut] if cut >= 0 else text) + suffix


def _timestr(seconds: float) -> str:
    whole = int(seconds)
    if whole:
        return "%u:%02u:%05.2f" % (whole // 3600, whole % 3600 // 60, whole % 60 + (seconds - whole))
    return "%05.2f sec" % seconds


def io_report(op: str, offset: int, count: int, seconds: float) -> str:
    """qemu-io's print_report: "wrote 512/512 bytes at offset 0" and its timing line."""
    t = max(seconds, 1e-9)
    return (f"{op} {count}/{count} bytes at offset {offset}\n"
            f"{_cvtstr(count)}, 1 ops; {_timestr(seconds)} ({_cvtstr(count / t)}/sec and {1 / t:.4f} ops/sec)\n")


class _Crash(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def _run_io_command(img, cmd: IoCommand) -> bool:
    """Run one command; print its report; return False when the command failed (already reported)."""
    if cmd.name == "flush":
        img.flush()
        return True
    if cmd.name in ("abort", "sigraise"):
        img.abort()
        raise _Crash(EXIT_KILLED if cmd.signal == 9 else EXIT_ABORT)
    if cmd.name == "reopen":
        img.flush()  # bdrv_reopen flushes first
        if cmd.cache is not None:
            from models.blockio import CacheMode

            img.cache_mode = CacheMode(cmd.cache)
        if cmd.lazy is not None:
            img.set_lazy_refcounts(cmd.lazy)
        return True
    start = time.perf_counter()
    ok = True
    if cmd.name == "write":
        if cmd.zero:
            img.write_zeroes(cmd.offset, cmd.length)
        else:
            img.write(cmd.offset, bytes([0xCD if cmd.pattern is None else cmd.pattern]) * cmd.length)
        if cmd.fua:
            img.flush()
        verb = "wrote"
    elif cmd.name == "read":
        data = img.read(cmd.offset, cmd.length)
        if cmd.pattern is not None:
            plen = cmd.length - cmd.pattern_offset if cmd.pattern_length is None else cmd.pattern_length
            chunk = data[cmd.pattern_offset : cmd.pattern_offset + plen]
            if chunk != bytes([cmd.pattern]) * plen:
                print(f"Pattern verification failed at offset {cmd.offset + cmd.pattern_offset}, {plen} bytes")
                ok = False
        verb = "read"
    else:
        img.discard(cmd.offset, cmd.length)
        verb = "discard"
    if not cmd.quiet:
        sys.stdout.write(io_report(verb, cmd.offset, cmd.length, time.perf_counter() - start))
    return ok


@_guard
def cmd_io(args: argparse.Namespace) -> int:
    from models.qcow2.errors import CorruptImage, ImageNotWritable, InvalidRequest, Qcow2Error
    from models.blockio import CacheMode
    from models.qcow2.image import Qcow2Image

    _check_format(args.format)
    cache = _cache_mode(args.cache, "-t")
    lazy = None if args.lazy_option is None else _lazy_option(args.lazy_option, "-o")
    # Like qemu-io: the -c commands, or with none, one command per line of standard input.
    commands = [parse_io_command(c) for c in args.cmd] if args.cmd else _stdin_commands()
    f = _open_file(args.file, readonly=args.read_only)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    status = 0
    try:
        img = Qcow2Image.open(f, readonly=args.read_only, cache_mode=CacheMode(cache), lazy_refcounts=lazy, log=log)
        try:
            for cmd in commands:
                if isinstance(cmd, UsageError):  # a bad line on stdin: reported, and the next one runs
                    _err(f"error: {cmd}")
                    status = 1
                    continue
                try:
                    if not _run_io_command(img, cmd):
                        status = 1
                except (InvalidRequest, ImageNotWritable) as exc:
                    # qemu-io reports a failed request and goes on with the next command.
                    _err(f"{cmd.name} failed: {exc}")
                    status = 1
                except CorruptImage as exc:
                    # QEMU marks the image corrupt and detaches the driver: nothing more is written.
                    _err(f"{cmd.name} failed: {exc}")
                    img.abort()
                    return 1
        except _Crash as crash:
            sys.stdout.flush()
            return crash.status
        except BaseException:
            img.abort()
            raise
        img.close()
    except Qcow2Error as exc:
        raise CommandFailed(str(exc)) from None
    finally:
        f.close()
    return status


def _stdin_commands():
    """Commands read from standard input, one a line (a prompt on a terminal); a bad line yields its UsageError."""
    tty = sys.stdin.isatty()
    while True:
        if tty:
            sys.stdout.write("qcrash io> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                yield parse_io_command(line.strip())
            except UsageError as exc:
                yield exc
