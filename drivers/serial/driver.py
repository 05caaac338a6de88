"""Instruments on a serial port: a status query they answer, status lines they stream,
or a modem-status line wired as a dry contact.

pyserial is blocking, so each read runs in a worker thread with a short timeout. A
port that is missing or fails is an error sample (UNKNOWN); it is opened again on the
next read, so an adapter that is re-plugged (use its /dev/serial/by-id/ path) is found.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import threading
from typing import Any

import serial

from labmeter import winsys
from labmeter.clock import Clock
from labmeter.drivers.base import Capability, Cause, DriverBase, Latest, Sample, sane_power
from labmeter.drivers.serial import SerialSource
from labmeter.wire import State

PORT_ERRORS: tuple[type[Exception], ...]
if sys.platform == "win32":
    PORT_ERRORS = (OSError, serial.SerialException, ValueError)
else:  # termios is POSIX-only: pyserial's tcsetattr failures on a pty or a vanished adapter
    import termios

    PORT_ERRORS = (OSError, serial.SerialException, ValueError, termios.error)

MODEM_LINES = {"CTS": "cts", "DSR": "dsr", "DCD": "cd", "RI": "ri"}


class SerialDriver(DriverBase):
    def __init__(self, source: SerialSource, stale_after_s: float, clock: Clock) -> None:
        self.src = source
        self.where = source.url
        self.regex = re.compile(source.regex) if source.regex else None
        self.clock = clock
        self.port: Any = None
        self._lock = threading.Lock()
        self.latest = Latest(clock, stale_after_s)
        self._reader: asyncio.Task[None] | None = None
        self._buffer = b""
        self.signin = re.compile(source.signin_regex) if source.signin_regex else None
        self.signins: list[tuple[int, str]] = []  # (UTC ms, card), taken by the agent and hashed there
        if self.signin is not None and source.mode == "stream":
            self.capabilities = Capability.SIGNINS

    def take_signins(self) -> list[tuple[int, str]]:
        taken, self.signins = self.signins, []
        return taken

    def _open(self) -> Any:
        if self.port is None:
            port = serial.serial_for_url(
                resolve_port(self.src.url),
                baudrate=self.src.baud,
                parity=self.src.parity,
                timeout=self.src.timeout_s,
                do_not_open=True,
            )
            port.open()
            if self.src.mode == "modem":
                port.dtr = (
                    True  # power the contact: DTR/RTS high, the instrument's relay closes onto CTS/DSR/DCD/RI
                )
                port.rts = True
            self.port = port
        return self.port

    def _drop(self) -> None:
        if self.port is not None:
            with contextlib.suppress(OSError, serial.SerialException):
                self.port.close()
        self.port = None

    def decode(self, text: str) -> Sample:
        """A line of the instrument's own text to power or state."""
        if self.regex is None:
            return (
                sane_power(float(text), self.where)
                if _is_number(text)
                else Sample(error=f"{self.where}: {text!r}", cause=Cause.UNREADABLE)
            )
        m = self.regex.search(text)
        if not m:
            return Sample(
                error=f"{self.where}: reply {text!r} does not match {self.src.regex!r}",
                raw=text,
                cause=Cause.NO_MATCH,
            )
        groups = m.groupdict()
        value = groups.get("value", m.group(1) if m.groups() else m.group(0))
        if self.src.value_map is not None:
            state = self.src.value_map.get(str(value).strip())
            if state is None:
                return Sample(
                    error=f"{self.where}: value {value!r} is not in value_map",
                    raw=text,
                    cause=Cause.UNREADABLE,
                )
            return Sample(status=State(state), raw=text)
        if self.src.running_mask is not None:
            try:
                bits = int(str(value).strip())
            except ValueError:
                return Sample(
                    error=f"{self.where}: {value!r} is not an integer status",
                    raw=text,
                    cause=Cause.UNREADABLE,
                )
            return Sample(status=State.RUNNING if bits & self.src.running_mask else State.STANDBY, raw=text)
        if not _is_number(str(value)):
            return Sample(error=f"{self.where}: {value!r} is not a number", raw=text, cause=Cause.UNREADABLE)
        return sane_power(float(value), self.where)

    def _query(self) -> Sample:
        port = self._open()
        assert self.src.command is not None
        port.reset_input_buffer()
        port.write(self.src.command.encode())
        reply = port.read_until(self.src.terminator.encode())
        if not reply.endswith(self.src.terminator.encode()):
            return Sample(
                error=f"{self.where}: no reply to {self.src.command.strip()!r} in {self.src.timeout_s:g} s",
                cause=Cause.NO_REPLY,
            )
        return self.decode(reply.decode(errors="replace").strip())

    def _modem(self) -> Sample:
        port = self._open()
        active = bool(getattr(port, MODEM_LINES[self.src.line]))
        return Sample(status=State.RUNNING if active else State.OFF, raw=active)

    def _read_blocking(self) -> Sample:
        with self._lock:
            try:
                return self._modem() if self.src.mode == "modem" else self._query()
            except PORT_ERRORS as exc:
                self._drop()
                return Sample(error=f"{self.where}: {exc}", cause=Cause.PORT)

    async def _stream(self) -> None:
        """Collect status lines as the instrument sends them; the newest one is the reading."""
        while True:
            try:
                chunk = await asyncio.to_thread(self._read_chunk)
            except (OSError, serial.SerialException) as exc:
                self._drop()
                self.latest.put(Sample(error=f"{self.where}: {exc}", cause=Cause.PORT))
                await asyncio.sleep(1.0)
                continue
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(self.src.terminator.encode())
            for line in lines:
                text = line.decode(errors="replace").strip()
                card = self.signin.search(text) if self.signin and text else None
                if card:
                    self.signins.append((self.clock.wall_ms(), card.group("card")))
                elif text:
                    self.latest.put(self.decode(text))

    def _read_chunk(self) -> bytes:
        port = self._open()
        data: bytes = port.read(max(1, port.in_waiting))
        return data

    async def start(self) -> None:
        if self.src.mode == "stream":
            self._reader = asyncio.create_task(self._stream())

    async def read(self) -> Sample:
        if self.src.mode != "stream":
            return await asyncio.to_thread(self._read_blocking)
        return self.latest.get(f"{self.where}: no status line yet", f"{self.where}: no status line")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._drop()


def resolve_port(url: str) -> str:
    """``usb-serial://SERIALNO`` is the USB adapter with that serial number, wherever it enumerated this time;
    on Windows ``COM12`` opens as ``\\\\.\\COM12``."""
    if not url.startswith("usb-serial://"):
        return winsys.serial_device(url)
    from serial.tools import list_ports

    wanted = url.removeprefix("usb-serial://")
    for p in list_ports.comports():
        if p.serial_number == wanted:
            return winsys.serial_device(str(p.device))  # COM12 from the port list opens as \\.\COM12
    raise serial.SerialException(f"no USB serial adapter with serial number {wanted!r} is plugged in")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
