"""qemu-img and qemu-io as judges of crash images: check (JSON), read-only reads, and recovery by each user path with its host log.

Every function here takes image bytes and works on a private copy in a scratch
directory, so calls are pure functions of their arguments; `JudgeCache` memoises
`check` by the image's hash (recovery often hands back the very bytes it was given,
and many crash states of one point build the same image).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile

from harness.targets import CheckSummary
from harness.targets.qemu.binaries import QemuBinaries
from harness.targets.qemu.blklog import parse_file
from harness.targets.qemu.hostlog import Converter
from harness.targets.qemu.reader import ViewReader, parse_dump
from harness.targets.qemu.session import QemuIo, failure_message, image_opts

__all__ = ["Judge", "parse_check", "parse_dump", "scratch_dir", "Run"]

SECTOR = 512
_TIMEOUT = 120
_CANT_OPEN = "can't open"


def scratch_dir(prefix: str) -> str:
    """A private directory for scratch images: tmpfs when there is one (judging images needs no O_DIRECT)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


class Run:
    """One tool invocation: argv, exit status and output, kept for findings and reproducer scripts."""

    def __init__(self, argv: list[str], proc: subprocess.CompletedProcess) -> None:
        self.argv, self.rc, self.stdout, self.stderr = argv, proc.returncode, proc.stdout, proc.stderr

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(line for line in (self.stderr + self.stdout).splitlines() if line.strip())


def _run(argv: list[str], cwd: str) -> Run:
    return Run(argv, subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, cwd=cwd))



def _key(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def parse_check(run: Run) -> CheckSummary:
    """A CheckSummary from `qemu-img check --output=json` (optional fields are omitted when 0)."""
    messages = tuple(line for line in run.stderr.splitlines() if line.strip())
    try:
        data = json.loads(run.stdout) if run.stdout.strip() else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        # No report at all: the image did not open, or check failed before counting.
        return CheckSummary(check_errors=1, messages=messages or (f"qemu-img check exited {run.rc} without a report",))
    errors = int(data.get("check-errors", 0))
    if run.rc == 1 and not errors:
        errors = 1  # "Check failed": QEMU counts it as not completed even when the JSON says 0
    return CheckSummary(corruptions=int(data.get("corruptions", 0)), leaks=int(data.get("leaks", 0)),
                        check_errors=errors, corruptions_fixed=int(data.get("corruptions-fixed", 0)),
                        leaks_fixed=int(data.get("leaks-fixed", 0)), messages=messages)


class Judge:
    """Runs the QEMU tools on private copies of image bytes, in one scratch directory."""

    def __init__(self, bins: QemuBinaries) -> None:
        self.bins = bins
        self.dir = scratch_dir("qcrash-judge-")
        self._n = 0
        self._checks: dict[bytes, CheckSummary] = {}
        self.runs = 0  # tool processes started (the benchmark divides by it)
        self._io: QemuIo | None = None
        self.quick = 0  # checks answered by quick_clean
        self.reader = ViewReader(self)

    def io(self) -> QemuIo:
        """One long-lived qemu-io that opens and closes crash images in turn (start-up dominates otherwise)."""
        if self._io is None or not self._io.alive:
            self.runs += 1
            self._io = QemuIo(self.bins, self.dir)
        return self._io

    def stop(self) -> None:
        if self._io is not None:
            self._io.kill()
            self._io = None


    def _path(self, stem: str) -> str:
        self._n += 1
        return os.path.join(self.dir, f"{stem}.{self._n}")

    def _put(self, raw: bytes, stem: str = "img") -> str:
        path = self._path(stem) + ".qcow2"
        with open(path, "wb") as f:
            f.write(raw)
        return path

    def tool(self, argv: list[str]) -> Run:
        self.runs += 1
        return _run(argv, self.dir)

    # ---- check ------------------------------------------------------------------------------------
    def check(self, raw: bytes) -> CheckSummary:
        key = _key(raw)
        hit = self._checks.get(key)
        if hit is not None:
            return hit
        if self.quick_clean(raw):
            return self._checks[key]
        path = self._put(raw)
        try:
            summary = parse_check(self.tool([self.bins.qemu_img, "check", "-f", "qcow2", "--output=json", path]))
        finally:
            os.unlink(path)
        self._remember(key, summary)
        return summary

    def quick_clean(self, raw: bytes) -> bool:
        """True if QEMU's own check finds nothing to report, learnt without starting qemu-img.

        A read-write open of an image with the dirty bit set runs the same check as
        `qemu-img check` (qcow2_co_check_locked, with fixing on) before anything else. So we
        set the dirty bit on a copy and open it in the long-lived qemu-io: every corruption
        and leak that check counts prints an ERROR / Leaked / Repairing line. Silence, a
        successful open, and a file that comes back byte for byte as it was (the close only
        clears the bit again) mean 0 corruptions, 0 leaks, 0 check errors. Anything else,
        and every v2 image (no dirty bit), is left to a real `qemu-img check`.
        """
        if len(raw) < 104 or raw[:4] != b"QFI\xfb" or raw[7] != 3 or raw[79] & 3:
            return False
        probe = bytearray(raw)
        probe[79] |= 1
        path = self._put(bytes(probe), "probe")
        try:
            out = self.io().send(f"open -o driver=qcow2,file.driver=file,file.filename={path}")
            if out.strip():
                if _CANT_OPEN not in out:
                    self.io().send("close")
                return False
            if self.io().send("close").strip():
                return False
            with open(path, "rb") as f:
                if f.read() != raw:
                    return False
            self._remember(_key(raw), CheckSummary())
            self.quick += 1
            return True
        finally:
            os.unlink(path)

    def cached_check(self, raw: bytes) -> CheckSummary | None:
        return self._checks.get(_key(raw))

    def _remember(self, key: bytes, summary: CheckSummary) -> None:
        if len(self._checks) > 4096:
            self._checks.clear()
        self._checks[key] = summary

    def remember_after_fix(self, path: str, summary: CheckSummary, rc: int) -> None:
        """Cache what `check -r` reported for the bytes it left.

        qemu-img check -r checks again after fixing anything ("Double checking the fixed
        image now...") and reports that second pass's corruptions, leaks and check errors
        beside the fixed counts; without fixes the one pass is a plain check. Either way the
        counts describe the file as it is now, so a later check of the same bytes is known.
        """
        if rc != 0 or summary.problems:
            return  # only a clean result is cached: a finding's evidence wants a check's own ERROR lines
        with open(path, "rb") as f:
            after = f.read()
        self._remember(_key(after), CheckSummary())

    # ---- read-only read ---------------------------------------------------------------------------
    def read_only(self, raw: bytes, sectors: set[int]) -> tuple[dict[int, bytes], str | None, str | None]:
        """Open read-only in QEMU and read `sectors`: (view, changed, error); see `reader.ViewReader`."""
        return self.reader.read_only(raw, sectors)

    # ---- recovery -----------------------------------------------------------------------------------
    def open_rw(self, path: str, conv: Converter, cache_mode: str, lazy: bool | None) -> tuple[str | None, tuple[str, ...]]:
        """Open read-write and close in the long-lived qemu-io (QEMU repairs a dirty image on open), logging
        through blklogwrites: (error or None, the lines QEMU printed)."""
        log = self._path("log")
        open(log, "wb").close()
        opts = image_opts(path, log, lazy=lazy)
        out = self.io().send(f"open -t {cache_mode} -d unmap -o {opts}")
        error = failure_message(out) if _CANT_OPEN in out else None
        if error is None:
            out += self.io().send("close")
        self._absorb(log, path, conv)
        return error, tuple(line for line in out.splitlines() if line.strip())

    def check_fix(self, path: str, conv: Converter, mode: str) -> tuple[Run, CheckSummary]:
        """`qemu-img check -r <mode>` through blklogwrites; what it reported."""
        log = self._path("log")
        open(log, "wb").close()
        run = self.tool([self.bins.qemu_img, "check", "-r", mode, "--output=json", "--image-opts",
                         image_opts(path, log)])
        self._absorb(log, path, conv)
        summary = parse_check(run)
        self.remember_after_fix(path, summary, run.rc)
        return run, summary

    def check_path(self, path: str) -> CheckSummary:
        with open(path, "rb") as f:
            return self.check(f.read())

    def _absorb(self, log: str, path: str, conv: Converter) -> None:
        try:
            conv.feed(parse_file(log).entries)
        finally:
            os.unlink(log)
        conv.reconcile(os.path.getsize(path))
        conv.settle()

    def new_image(self, raw: bytes) -> str:
        return self._put(raw, "rec")
