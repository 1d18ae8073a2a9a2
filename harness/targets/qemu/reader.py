"""Read-only reads of crash images by QEMU: hex dumps in the judge's long-lived qemu-io for small reads, `qemu-img convert` for large ones, cached by image hash."""

from __future__ import annotations

import hashlib
import os

from harness.targets.qemu.session import SessionError, failure_message

__all__ = ["ViewReader", "parse_dump"]

SECTOR = 512
_DUMP_LIMIT = 64 << 10  # above this many bytes a view is read by `qemu-img convert`: a hex dump costs more
_CANT_OPEN = "can't open"


def _runs(sectors: list[int]) -> list[tuple[int, int]]:
    """Sorted sector numbers as (first, count) runs of consecutive sectors."""
    runs: list[tuple[int, int]] = []
    for s in sectors:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


def parse_dump(output: str, offset: int, length: int) -> bytes:
    """The bytes of a `read -v` hex dump ("%08x:  xx xx ... xx  ascii"), checked against the expected range."""
    lines = [line for line in output.splitlines() if line[8:11] == ":  "]
    try:
        data = bytes.fromhex("".join(line[11:58] for line in lines))
        first = int(lines[0][:8], 16) if lines else offset
        last = int(lines[-1][:8], 16) if lines else offset
    except ValueError as exc:
        raise SessionError(f"read -v dump is not hex ({exc})", "read -v", output[:400]) from None
    # qemu-io prints 16 bytes a line from the request's offset; a gap or a short dump is an error.
    if len(data) != length or first != offset or last != offset + length - 16 or len(lines) * 16 != length:
        raise SessionError(f"read -v returned {len(data)} bytes from {first:#x}, expected {length} from {offset:#x}",
                           "read -v", output[-400:])
    return data


class ViewReader:
    """The read-only reads of one `tools.Judge` (its qemu-io, scratch directory and process count)."""

    def __init__(self, judge) -> None:
        self.judge = judge
        self._views: dict[bytes, dict[int, bytes]] = {}

    def read_only(self, raw: bytes, sectors: set[int]) -> tuple[dict[int, bytes], str | None, str | None]:
        """Open read-only in QEMU (no repair of a dirty image) and read `sectors`: (view, changed, error).

        Views are cached by the image's hash: QEMU reads the same bytes the same way, and a
        recovery that changed nothing (a clean crash image) is read again right after.
        """
        key = hashlib.blake2b(raw, digest_size=16).digest()
        seen = self._views.get(key)
        if seen is not None and sectors <= seen.keys():
            return {s: seen[s] for s in sectors}, None, None
        view, changed, error = self._read_only(raw, sectors)
        if changed is None and error is None:
            if len(self._views) > 64:
                self._views.clear()
            self._views.setdefault(key, {}).update(view)
        return view, changed, error

    def _read_only(self, raw: bytes, sectors: set[int]) -> tuple[dict[int, bytes], str | None, str | None]:
        if len(sectors) * SECTOR > _DUMP_LIMIT:
            return self._read_by_convert(raw, sectors)
        path = self.judge._put(raw)
        try:
            out = self.judge.io().send(f"open -r -o driver=qcow2,file.driver=file,file.filename={path}")
            if _CANT_OPEN in out:
                return {}, self._changed(path, raw), failure_message(out)
            try:
                view = self._dump(sorted(sectors))
            finally:
                self.judge.io().send("close")
            return view, self._changed(path, raw), None
        finally:
            os.unlink(path)

    def _dump(self, sectors: list[int]) -> dict[int, bytes]:
        view: dict[int, bytes] = {}
        for first, count in _runs(sectors):
            offset, length = first * SECTOR, count * SECTOR
            out = self.judge.io().send(f"read -v {offset} {length}")
            data = parse_dump(out, offset, length)
            for i in range(count):
                view[first + i] = data[i * SECTOR:(i + 1) * SECTOR]
        return view

    def _read_by_convert(self, raw: bytes, sectors: set[int]) -> tuple[dict[int, bytes], str | None, str | None]:
        # Large reads: a raw copy is cheaper than a hex dump of every sector.
        path = self.judge._put(raw)
        out = path + ".raw"
        try:
            run = self.judge.tool([self.judge.bins.qemu_img, "convert", "-f", "qcow2", "-O", "raw", path, out])
            changed = self._changed(path, raw)
            if run.rc != 0:
                return {}, changed, " ".join(run.lines) or f"qemu-img convert exited {run.rc}"
            with open(out, "rb") as f:
                disk = f.read()
            return {s: disk[s * SECTOR:(s + 1) * SECTOR] for s in sectors}, changed, None
        finally:
            for p in (path, out):
                if os.path.exists(p):
                    os.unlink(p)

    @staticmethod
    def _changed(path: str, raw: bytes) -> str | None:
        with open(path, "rb") as f:
            after = f.read()
        if after == raw:
            return None
        first = next((i for i in range(min(len(raw), len(after))) if raw[i] != after[i]), min(len(raw), len(after)))
        return f"the read-only open changed the image file ({len(raw)} -> {len(after)} bytes, first at {first:#x})"

