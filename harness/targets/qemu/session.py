"""One long-lived qemu-io process per example: commands on stdin one at a time, each one's host operations captured through blklogwrites.

Protocol. qemu-io with a non-terminal stdin prints the prompt ``qemu-io> `` (and flushes
stdout) before reading each command, so the bytes between two prompts are exactly one
command's output (stderr is merged into stdout for that reason). A command's I/O is
synchronous in qemu-io: when the next prompt appears, every request it issued has
completed, and blklogwrites appends a request's log entry (a plain pwrite to the log
file, visible to us through the page cache) *before* completing the request. So reading
the log file up to its current end after the prompt gives the command's complete span.
The log's super block lags (it is rewritten only at FLUSH entries), so we scan entries
instead of trusting `nr_entries` (see `blklog`).

Each open of the image gets a fresh log file (blklogwrites restarts at sector 1 and does
not truncate, so reusing a log would splice old entries after new ones); all of them feed
one `Converter`, so the example has a single host-operation log from image creation on.

Determinism: `cache-clean-interval=0` keeps QEMU's cache-cleaning timer from writing on
its own; there are no other timers in qcow2 that write.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

from harness.targets.qemu.binaries import QemuBinaries
from harness.targets.qemu.blklog import scan
from harness.targets.qemu.hostlog import Converter

__all__ = ["QemuIo", "QemuSession", "SessionError", "PROMPT", "image_opts", "failed", "failure_message"]

PROMPT = b"qemu-io> "
LOG_SECTOR = 512


class SessionError(Exception):
    """qemu-io died, hung or printed an error for a command that must succeed; carries the command and its output."""

    def __init__(self, message: str, command: str = "", output: str = "") -> None:
        self.command, self.output = command, output
        super().__init__(f"{message}: command {command!r}: {output.strip()[:400]}" if command else message)


def image_opts(image: str, log: str | None, *, lazy: bool | None = None, extra: str = "") -> str:
    """The --image-opts string: qcow2 over blklogwrites (when `log` is given) over the file."""
    # Paths go into a comma-separated option string: refuse the one character that would split it.
    for path in (image, log or ""):
        if "," in path:
            raise ValueError(f"path {path!r} contains a comma, which QEMU's option syntax cannot hold unescaped")
    opts = ["driver=qcow2", "cache-clean-interval=0"]
    if lazy is not None:
        opts.append(f"lazy-refcounts={'on' if lazy else 'off'}")
    if log is None:
        opts += ["file.driver=file", f"file.filename={image}"]
    else:
        opts += ["file.driver=blklogwrites", "file.file.driver=file", f"file.file.filename={image}",
                 "file.log.driver=file", f"file.log.filename={log}", f"file.log-sector-size={LOG_SECTOR}"]
    if extra:
        opts.append(extra)
    return ",".join(opts)


class LogTail:
    """Reads the entries appended to one blklogwrites log file since the last call."""

    def __init__(self, path: str) -> None:
        self.path = path
        open(path, "wb").close()  # blklogwrites needs the file to exist, and it must start empty
        self.end = LOG_SECTOR
        self.count = 0

    def read_new(self):
        with open(self.path, "rb") as f:
            f.seek(self.end)
            data = f.read()
        entries, end = scan(data, name=self.path, sector_size=LOG_SECTOR, base=self.end, first_index=self.count)
        self.end = end
        self.count += len(entries)
        return entries


class QemuIo:
    """A qemu-io process driven by the prompt protocol; no image of its own until a command opens one."""

    def __init__(self, bins: QemuBinaries, workdir: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen([bins.qemu_io], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=workdir)
        self._buf = b""
        self._read_prompt("start")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, line: str) -> str:
        """Send one command and return its output (everything up to the next prompt)."""
        if self.proc.poll() is not None:
            raise SessionError(f"qemu-io exited with status {self.proc.returncode}", line)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read_prompt(line)

    def _read_prompt(self, line: str) -> str:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        chunks = [self._buf]
        tail = self._buf[-len(PROMPT):]
        while not tail.endswith(PROMPT):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SessionError(f"no prompt within {self.timeout:.0f} s", line, b"".join(chunks).decode(errors="replace"))
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise SessionError(f"qemu-io exited (status {self.proc.wait()})", line,
                                       b"".join(chunks).decode(errors="replace"))
                chunks.append(chunk)
                tail = (tail + chunk)[-len(PROMPT):]
        out = b"".join(chunks)
        self._buf = b""
        return out[:-len(PROMPT)].decode(errors="replace")

    def kill(self) -> None:
        """Stop qemu-io at once (a crash of the host process; nothing more reaches the file)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def quit(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class QemuSession:
    """A qemu-io process on one image; every command's host operations go to `self.conv.log`."""

    def __init__(self, bins: QemuBinaries, image: str, workdir: str, cache_mode: str, *, lazy: bool | None = None,
                 extra_opts: str = "", timeout: float = 60.0) -> None:
        self.bins, self.image, self.workdir = bins, image, workdir
        self.cache_mode, self.lazy, self.extra_opts, self.timeout = cache_mode, lazy, extra_opts, timeout
        with open(image, "rb") as f:
            self.conv = Converter(f.read())
        self._logs = 0
        self.tail: LogTail | None = None
        self.commands: list[str] = []  # every command sent, for the reproducer script
        self.io = QemuIo(bins, workdir, timeout)
        self.open()

    def command(self, line: str, *, must_succeed: bool = True) -> str:
        """Send one command, wait for the next prompt, absorb the log; return the command's output."""
        self.commands.append(line)
        out = self.io.send(line)
        self._absorb()
        if must_succeed and failed(out):
            raise SessionError("qemu-io reported an error", line, out)
        return out

    def _absorb(self) -> None:
        if self.tail is not None:
            self.conv.feed(self.tail.read_new())
        self.conv.reconcile(os.path.getsize(self.image))
        self.conv.settle()

    # ---- image lifetime -------------------------------------------------------------------------
    def open(self) -> None:
        self._logs += 1
        self.tail = LogTail(os.path.join(self.workdir, f"log.{self._logs}"))
        opts = image_opts(self.image, self.tail.path, lazy=self.lazy, extra=self.extra_opts)
        self.command(f"open -t {self.cache_mode} -d unmap -o {opts}")

    def close(self) -> None:
        self.command("close")
        self.tail = None

    def reopen(self, *, lazy: bool | None = None, cache_mode: str | None = None) -> None:
        """Close and open again with changed lazy refcounts and/or cache mode.

        Not qemu-io's `reopen`: blklogwrites refuses it in 7.2 ("does not support reopening
        files"), and a closed and reopened image is also what the python target does.
        """
        if cache_mode is not None:
            self.cache_mode = cache_mode
        if lazy is not None:
            self.lazy = lazy
        self.close()
        self.open()

    def external(self, argv_for_log) -> subprocess.CompletedProcess:
        """Run another tool on the closed image with its own blklogwrites log, absorbed into this session's log.

        `argv_for_log(opts)` builds the command line from the --image-opts string.
        """
        self._logs += 1
        tail = LogTail(os.path.join(self.workdir, f"log.{self._logs}"))
        argv = argv_for_log(image_opts(self.image, tail.path, lazy=None))
        self.commands.append("# " + " ".join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, cwd=self.workdir)
        self.conv.feed(tail.read_new())
        self.conv.reconcile(os.path.getsize(self.image))
        self.conv.settle()
        return proc

    def kill(self) -> None:
        self.io.kill()

    def quit(self) -> None:
        """Close the image cleanly and end qemu-io."""
        if self.io.alive and self.tail is not None:
            self.close()
        self.io.quit()


def failed(output: str) -> bool:
    # qemu-io prints failures as "<command>: <strerror>" or "command ... not found"; a
    # successful write/discard prints "wrote"/"discarded" statistics and flush prints nothing.
    for line in output.splitlines():
        low = line.lower()
        if ("error" in low or "failed" in low or "not found" in low or "invalid" in low
                or "cannot" in low or "could not" in low or low.startswith("qemu-io:")):
            return True
    return False


def failure_message(output: str) -> str:
    """The failure line first ("qemu-io: can't open: ..."), then the first of the repair messages before it."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    failure = [line for line in lines if "can't open" in line]
    rest = [line for line in lines if "can't open" not in line]
    text = " ".join(failure)
    if rest:
        text += f" ({len(rest)} lines before it, first: {rest[0]})"
    return text[:600]
