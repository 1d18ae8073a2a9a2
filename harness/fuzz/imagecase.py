"""Running one malformed image through the library (open, read, write, check, repair) and classifying each step's outcome.

Outcome classes (results as data, `Step.cls`):

- `result`: the step worked;
- `named`: it failed with a named qcrash error (a `Qcow2Error`);
- `unexpected`: any other exception escaped (a bug: a bare traceback for the user);
- `over-time`: it ran past the time limit (measured; a hard limit interrupts it);
- `over-memory`: it raised MemoryError (the CLI also caps the address space);
- `read-only-write`: a read-only open, a read or a check without repair wrote to the file;
- `wrong-result`: a write that succeeded did not read back.

Timing uses a real-time interval timer (main thread only): the hard limit turns a
runaway step into `over-time` instead of a hang.
"""

from __future__ import annotations

import dataclasses
import signal
import time
import traceback
from contextlib import contextmanager

from models.blockio import MemoryFile, WriteSite
from models.qcow2 import check as checkmod
from models.qcow2.errors import Qcow2Error
from models.qcow2.image import Qcow2Image

FAILURES = ("unexpected", "over-time", "over-memory", "read-only-write", "wrong-result")
STEPS = ("open-ro", "check", "open-rw", "repair")


@dataclasses.dataclass
class Step:
    name: str
    cls: str
    detail: str = ""
    seconds: float = 0.0
    ended: str = ""  # for an over-time step that finished: the class it ended with
    corrupt: bool = False  # open-rw: a fatal corruption event ("Marking image as corrupt") happened


class _OverTime(BaseException):
    """Raised by the interval timer inside a runaway step (BaseException: library code must not swallow it)."""


class _ReadOnlyWrite(BaseException):
    """Raised by GuardFile on a write where none may happen."""


class GuardFile(MemoryFile):
    """A MemoryFile that refuses (and so reveals) every write: for steps that must not write."""

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
        raise _ReadOnlyWrite(f"pwrite at {offset:#x} length {len(data)} site {site}")

    def truncate(self, size: int) -> None:
        raise _ReadOnlyWrite(f"truncate to {size:#x}")

    def flush(self) -> None:
        pass


@contextmanager
def _deadline(seconds: float):
    if seconds <= 0:
        yield
        return

    def fire(_sig, _frame):
        raise _OverTime()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    at = f" at {last.filename.rsplit('/', 2)[-2:]!s}:{last.lineno} in {last.name}" if last else ""
    return f"{type(exc).__name__}: {str(exc)[:160]}{at}"


def run_step(name: str, fn, *, time_limit: float, hard_limit: float) -> Step:
    start = time.perf_counter()
    try:
        with _deadline(hard_limit):
            detail = fn() or ""
        cls = "result"
    except _OverTime:
        cls, detail = "over-time", f"interrupted after {hard_limit:g}s"
    except _ReadOnlyWrite as exc:
        cls, detail = "read-only-write", str(exc)
    except Qcow2Error as exc:
        cls, detail = "named", str(exc)[:200]
    except MemoryError as exc:
        cls, detail = "over-memory", _where(exc)
    except _WrongResult as exc:
        cls, detail = "wrong-result", str(exc)
    except Exception as exc:  # noqa: BLE001 - classifying every escape is the point
        cls, detail = "unexpected", _where(exc)
    seconds = time.perf_counter() - start
    if cls != "over-time" and seconds > time_limit:
        return Step(name, "over-time", f"{seconds:.2f}s ({detail[:100]})", seconds, ended=cls)
    return Step(name, cls, detail, seconds)


class _WrongResult(Exception):
    pass


def _reads(img: Qcow2Image) -> None:
    size = img.size
    cs = img.geo.cluster_size
    for off in {0, size // 2 // 512 * 512, max(0, size - 512)}:
        length = min(cs, size - off)
        if length > 0:
            img.read(off, length)


def step_open_ro(raw: bytes, name: str) -> str:
    img = Qcow2Image.open(GuardFile(raw, name=name), readonly=True)
    _reads(img)
    img.close()
    return ""


def step_check(raw: bytes, name: str) -> str:
    result = checkmod.check(GuardFile(raw, name=name), checkmod.Fix.NONE)
    return f"corruptions={result.corruptions} leaks={result.leaks} check_errors={result.check_errors}"


def planned_writes(size: int, cs: int) -> list[tuple[int, int, int]]:
    """The (offset, length, pattern) writes of the open-rw step: the first sector, and a cluster mid-disk."""
    out = []
    for off, length, byte in ((0, 512, 0x11), (size // 2 // cs * cs, cs, 0x22)):
        length = min(length, size - off)
        if length > 0:
            out.append((off, length, byte))
    return out


def step_open_rw(raw: bytes, name: str, max_size: int, log: list[str] | None = None) -> str:
    """Open read-write (a dirty image is repaired), write `planned_writes`, read them back, flush, close.

    `log` collects what the image logs (QEMU's stderr lines: corruption events included).
    """
    mem = MemoryFile(raw, name=name, max_size=max_size)
    img = Qcow2Image.open(mem, log=None if log is None else log.append)
    try:
        for off, length, byte in planned_writes(img.size, img.geo.cluster_size):
            data = bytes([byte]) * length
            img.write(off, data)
            back = img.read(off, length)
            if back != data:
                raise _WrongResult(f"write of {length} bytes at {off:#x} read back differently")
        img.flush()
    except BaseException:
        img.abort()
        raise
    img.close()
    return "written"


def step_repair(raw: bytes, name: str, max_size: int) -> str:
    mem = MemoryFile(raw, name=name, max_size=max_size)
    result = checkmod.repair(mem, checkmod.Fix.ALL)
    if result.consistent_after_fix:
        again = checkmod.check(GuardFile(mem.getvalue(), name=name), checkmod.Fix.NONE)
        if again.corruptions or again.check_errors:
            raise _WrongResult(f"repair reported success but a second check finds {again.corruptions} corruptions, "
                               f"{again.check_errors} check errors")
        Qcow2Image.open(GuardFile(mem.getvalue(), name=name), readonly=True).close()
    return f"consistent_after_fix={result.consistent_after_fix}"


def run_library(raw: bytes, *, name: str = "case.qcow2", time_limit: float = 2.0, hard_limit: float = 10.0,
                steps: tuple[str, ...] = STEPS) -> list[Step]:
    """Every library step on the same bytes; each starts from the unmodified image."""
    max_size = max(64 << 20, 4 * len(raw))
    rw_log: list[str] = []
    fns = {
        "open-ro": lambda: step_open_ro(raw, name),
        "check": lambda: step_check(raw, name),
        "open-rw": lambda: step_open_rw(raw, name, max_size, rw_log),
        "repair": lambda: step_repair(raw, name, max_size),
    }
    out = [run_step(s, fns[s], time_limit=time_limit, hard_limit=hard_limit) for s in steps]
    for step in out:
        if step.name == "open-rw":
            step.corrupt = any("Marking image as corrupt" in line for line in rw_log)
    return out


def failures(steps: list[Step]) -> list[Step]:
    return [s for s in steps if s.cls in FAILURES]
