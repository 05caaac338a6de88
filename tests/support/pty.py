"""A socat pty pair: the two ends of a serial cable, the far one played by a test's instrument."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial

SOCAT = shutil.which("socat")


class PtyPair:
    def __init__(self, tmp: Path) -> None:
        self.a, self.b = tmp / "meter", tmp / "agent"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert SOCAT
        self.proc = subprocess.Popen(
            [SOCAT, f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (self.a.exists() and self.b.exists()):
            assert time.monotonic() < deadline, "socat did not create the pty pair"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[PtyPair]:
    p = PtyPair(tmp_path)
    p.start()
    yield p
    p.stop()


class Instrument:
    """A fake instrument on the far end of the pty: answers queries, or streams lines."""

    def __init__(self, path: str, answer: Callable[[bytes], bytes | None], terminator: bytes = b"\n") -> None:
        self.path, self.answer, self.terminator = path, answer, terminator
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        # pyserial flushes the input buffer when it opens the port: a query sent before that is lost, and the
        # first read would time out for a reason no real instrument has
        if not self.ready.wait(5):
            raise RuntimeError(f"the fake instrument could not open {path}")

    def run(self) -> None:
        with serial.Serial(self.path, 9600, timeout=0.05) as port:
            self.ready.set()
            while not self.stop.is_set():
                req = port.read_until(self.terminator)
                reply = self.answer(req)
                if reply:
                    port.write(reply)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
