"""The live progress line of a fuzz run: redrawn on a timer (not only when an example ends), with the time since the last finding."""

from __future__ import annotations

import sys
import threading
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A bar redrawn every 0.5 s on a terminal; a plain line every 10 s otherwise. Thread-safe counters."""

    def __init__(self, total: int | None, seconds: float | None, stream=None, *, interval: float | None = None) -> None:
        self.total, self.seconds = total, seconds
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.t0 = time.monotonic()
        self.done = self.states = self.findings = 0
        self.last_finding: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Progress":
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._tick, name="qcrash-progress", daemon=True)
        self._thread.start()
        return self

    def update(self, done: int, states: int, findings: int, force: bool = False) -> None:
        with self._lock:
            if findings > self.findings:
                self.last_finding = time.monotonic()
            self.done, self.states, self.findings = done, states, findings
        if force:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None
        self.render(final=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.render()

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        with self._lock:
            done, states, findings, last = self.done, self.states, self.findings, self.last_finding
        elapsed = now - self.t0
        rate = states / elapsed if elapsed > 0 else 0.0
        if self.total:
            left = f"{done}/{self.total} examples"
        else:
            left = f"{done} examples, {_clock(max(0.0, (self.seconds or 0) - elapsed))} left"
        since = f"last {_clock(now - last)} ago" if last is not None else "none yet"
        return (f"{left} | {states} crash states ({rate:.0f}/s) | {findings} findings ({since}) | "
                f"{_clock(elapsed)} elapsed")

    def fraction(self, now: float) -> float:
        if self.total:
            return min(1.0, self.done / self.total)
        return min(1.0, (now - self.t0) / self.seconds) if self.seconds else 0.0

    def render(self, final: bool = False) -> None:
        now = time.monotonic()
        text = self.line(now)
        if self.tty:
            bar = "#" * int(self.fraction(now) * 24)
            self.stream.write(f"\r[{bar:<24}] {text}\033[K" + ("\n" if final else ""))
        else:
            self.stream.write(f"qcrash: {text}\n")
        self.stream.flush()
