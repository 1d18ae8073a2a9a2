"""`QemuTarget`: real qemu-io / qemu-img behind the target seam (the live image in one qemu-io session, crash images judged by the QEMU tools)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable

from harness.config import Config
from harness.faultfile import WriteLog
from harness.targets import CheckSummary, HeaderInfo, OpenOptions, ReadOnlyView, Recovery, RecoveryPath, Target
from harness.targets.qemu.binaries import QemuBinaries, find_binaries
from harness.targets.qemu.hostlog import Converter
from harness.targets.qemu.layout import guest_allocated, refcounts_past_eof
from harness.targets.qemu.session import QemuSession, SessionError
from harness.targets.qemu.recovery import recover_file
from harness.targets.qemu.tools import Judge, Run, parse_check, parse_dump
from models.blockio import CacheMode

__all__ = ["QemuTarget", "create_argv"]

SECTOR = 512
_DUMP_CHUNK = 1 << 20


def create_argv(bins: QemuBinaries, config: Config, path: str) -> list[str]:
    """`qemu-img create` for a configuration (v2 images take compat=0.10 and have no lazy refcounts)."""
    opts = [f"compat={'1.1' if config.version == 3 else '0.10'}", f"cluster_size={config.cluster_size}",
            f"refcount_bits={config.refcount_bits}"]
    if config.version == 3:
        opts.append(f"lazy_refcounts={'on' if config.lazy_refcounts else 'off'}")
    return [bins.qemu_img, "create", "-q", "-f", "qcow2", "-o", ",".join(opts), path, str(config.virtual_size)]


class QemuTarget(Target):
    """The implementation under test is QEMU: `extra_opts` (e.g. "cache.no-flush=on") go onto every live open.

    `strict_past_eof`: report refcounts of clusters past the end of the file (qcrash's
    stricter rule). Off by default for QEMU: its check skips them by design
    (`compare_refcounts` stops at the file's last cluster), and QEMU 7.2 leaves them after
    a crash between `l2_allocate`'s refblock flush and the L2 write (finding Q1 in
    corpora/qemu-7.2/README.md): harmless, a leak once the file grows over them.
    """

    name = "qemu"

    def __init__(self, qemu_img: str | None = None, qemu_io: str | None = None, extra_opts: str = "",
                 bins: QemuBinaries | None = None, strict_past_eof: bool = False) -> None:
        self.bins = bins or find_binaries(qemu_img, qemu_io)
        self.extra_opts = extra_opts
        self.strict_past_eof = strict_past_eof
        self.judge = Judge(self.bins)
        self.workdir = tempfile.mkdtemp(prefix="qcrash-qemu-")
        self.image = os.path.join(self.workdir, "image.qcow2")
        self.session: QemuSession | None = None
        self.config: Config | None = None
        self._opts = OpenOptions()
        self._payload = os.path.join(self.workdir, "payload.bin")
        self.script: list[str] = []  # the live commands so far (earlier sessions), for the reproducer script

    def describe(self) -> str:
        return f"qemu {self.bins.version} (qemu-img {self.bins.qemu_img}, qemu-io {self.bins.qemu_io})"

    # ---- the live image --------------------------------------------------------------------------
    def create(self, config: Config) -> None:
        self.config = config
        argv = create_argv(self.bins, config, self.image)
        run = self.judge.tool(argv)
        if run.rc != 0:
            raise SessionError(f"qemu-img create exited {run.rc}", " ".join(argv), run.stderr)
        self.script = [" ".join(argv[:-2] + ["image.qcow2", argv[-1]])]
        self._opts = OpenOptions(CacheMode(config.cache_mode), None)
        self._start()

    def _start(self) -> None:
        self.session = QemuSession(self.bins, self.image, self.workdir, str(self._opts.cache_mode),
                                   lazy=self._opts.lazy_refcounts, extra_opts=self.extra_opts)

    @property
    def options(self) -> OpenOptions:
        return self._opts

    @property
    def log(self) -> WriteLog:
        return self._live().conv.log

    def _live(self) -> QemuSession:
        if self.session is None:
            raise SessionError("no live image: create() first")
        return self.session

    def write(self, offset: int, data: bytes) -> None:
        with open(self._payload, "wb") as f:
            f.write(data)
        self._live().command(f"write -q -s {self._payload} {offset} {len(data)}")

    def write_zeroes(self, offset: int, length: int) -> None:
        self._live().command(f"write -q -z {offset} {length}")

    def discard(self, offset: int, length: int) -> None:
        self._live().command(f"discard -q {offset} {length}")

    def flush(self) -> None:
        self._live().command("flush")

    def read(self, offset: int, length: int) -> bytes:
        out = b""
        for lo in range(offset, offset + length, _DUMP_CHUNK):
            n = min(_DUMP_CHUNK, offset + length - lo)
            out += parse_dump(self._live().command(f"read -v {lo} {n}"), lo, n)
        return out

    def reopen(self, cache_mode: str | None, lazy_refcounts: bool | None) -> None:
        self._live().reopen(lazy=lazy_refcounts, cache_mode=cache_mode)
        self._opts = OpenOptions(CacheMode(cache_mode) if cache_mode else self._opts.cache_mode,
                                 self._opts.lazy_refcounts if lazy_refcounts is None else lazy_refcounts)

    def live_check(self) -> CheckSummary:
        # qemu-img check cannot see qemu-io's cached tables: close (writing them), check, open again.
        session = self._live()
        session.close()
        summary = self.judge.check_path(self.image)
        session.commands.append("# qemu-img check image.qcow2")
        session.open()
        return summary

    def live_repair(self, mode: str) -> CheckSummary:
        session = self._live()
        session.close()
        proc = session.external(lambda opts: [self.bins.qemu_img, "check", "-r", mode, "--output=json",
                                              "--image-opts", opts])
        session.open()
        return parse_check(Run(proc.args, proc))

    def close(self) -> None:
        if self.session is not None:
            self.session.quit()

    def contents(self) -> bytes:
        with open(self.image, "rb") as f:
            return f.read()

    def abort(self) -> None:
        if self.session is not None:
            self.session.kill()

    def history(self) -> list[str]:
        """The qemu-img create line and every qemu-io command of the example so far, scratch paths shortened."""
        lines = self.script + (self.session.commands if self.session else [])
        return [line.replace(self.workdir + "/", "") for line in lines]

    def restart(self, image: bytes) -> None:
        self.abort()
        if self.session is not None:
            self.script += self.session.commands + ["# crash: qemu-io killed; continuing on the recovered image"]
        with open(self.image, "wb") as f:
            f.write(image)
        self._start()

    def release(self) -> None:
        """End every QEMU process this target started (the live session and the judging qemu-io)."""
        self.abort()
        self.judge.stop()

    def __del__(self) -> None:  # scratch space only; the processes are ended by close/abort
        try:
            self.abort()
            self.judge.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
            shutil.rmtree(self.judge.dir, ignore_errors=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- judging ---------------------------------------------------------------------------------
    def inspect(self, raw: bytes) -> HeaderInfo:
        return inspect_header(raw)

    def check(self, raw: bytes, *, past_eof: bool = False) -> CheckSummary:
        summary = self.judge.check(raw)
        if past_eof and self.strict_past_eof:
            summary = dataclasses.replace(summary, refcounts_past_eof=refcounts_past_eof(raw))
        return summary

    def read_only(self, raw: bytes, sectors: Iterable[int], *, allocated: bool = True) -> ReadOnlyView:
        wanted = set(sectors)
        clusters = guest_allocated(raw) if allocated else ()
        if clusters:
            cs = 1 << struct.unpack_from(">I", raw, 20)[0]
            for guest in clusters:
                wanted.update(range(guest // SECTOR, (guest + cs) // SECTOR))
        size = struct.unpack_from(">Q", raw, 24)[0] if len(raw) >= 32 else 0
        wanted = {s for s in wanted if s * SECTOR < size}
        view, changed, error = self.judge.read_only(raw, wanted)
        return ReadOnlyView(view, tuple(clusters), changed, error)

    def recover(self, raw: bytes, path: RecoveryPath, options: OpenOptions, *, record: bool = True) -> Recovery:
        image = self.judge.new_image(raw)
        conv = Converter(raw)
        messages: list[str] = []
        events: list[str] = []
        try:
            error = recover_file(self.judge, image, conv, RecoveryPath(path), options, messages, events)
            with open(image, "rb") as f:
                recovered = f.read()
        finally:
            os.unlink(image)
        if error:
            return Recovery(None, conv.log if record else None, tuple(messages), tuple(events), error)
        return Recovery(recovered, conv.log if record else None, tuple(messages), tuple(events))

def inspect_header(raw: bytes) -> HeaderInfo:
    """The incompatible-feature bits as QEMU's open would first see them, or the rule that refuses the header."""
    if len(raw) < 72:
        return HeaderInfo(error=f"image is {len(raw)} bytes, shorter than a qcow2 header (72)")
    magic, version = struct.unpack_from(">4sI", raw, 0)
    if magic != b"QFI\xfb":
        return HeaderInfo(error="Image is not in qcow2 format")
    if version not in (2, 3):
        return HeaderInfo(error=f"Unsupported qcow2 version {version}")
    if version == 2:
        return HeaderInfo(0)
    if len(raw) < 80:
        return HeaderInfo(error="qcow2 header too short")
    return HeaderInfo(struct.unpack_from(">Q", raw, 72)[0])
