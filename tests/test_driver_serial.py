"""Serial instruments over socat pty pairs (query/response, streaming lines, unplug and back), and modem-status
dry contacts through pyserial's loop://.

ptys carry no modem-status lines, so the dry contact is tested on loop://, which loops RTS to CTS and DTR to
DSR: opening the contact is simulated by dropping RTS, the one thing here that stands in for hardware.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from labmeter.clock import Clock
from labmeter.drivers.base import Sample
from labmeter.drivers.serial import SerialSource, with_profile
from labmeter.drivers.serial.driver import SerialDriver
from labmeter.wire import State
from tests.support.pty import SOCAT, Instrument, PtyPair, pty  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(SOCAT is None, reason="socat is not installed (make deps installs it)")


def reads(
    src: SerialSource,
    n: int,
    gap: float = 0.1,
    stale: float = 30.0,
    between: Callable[[int], None] | None = None,
) -> list[Sample]:
    async def main() -> list[Sample]:
        d = SerialDriver(src, stale, Clock())
        await d.start()
        out = []
        for i in range(n):
            await asyncio.sleep(gap)
            out.append(await d.read())
            if between:
                await asyncio.get_running_loop().run_in_executor(None, between, i)
        await d.close()
        return out

    return asyncio.run(main())


def test_scpi_profile_query(pty: PtyPair) -> None:  # noqa: F811
    replies = iter([b"+16\n", b"+0\n", b"garbage\n"])
    inst = Instrument(str(pty.a), lambda req: next(replies, None) if req == b"STAT:OPER:COND?\n" else None)
    try:
        src = with_profile(SerialSource(url=str(pty.b), profile="scpi-operation-status", timeout_s=0.5), None)
        got = reads(src, 3)
    finally:
        inst.close()
    assert [s.status for s in got[:2]] == [State.RUNNING, State.STANDBY]
    assert got[2].status is None and got[2].error is not None and "does not match" in got[2].error


def test_custom_command_and_regex_to_power(pty: PtyPair) -> None:  # noqa: F811
    inst = Instrument(str(pty.a), lambda req: b"P=1234.5W\r" if req == b"PWR?\r" else None, terminator=b"\r")
    try:
        got = reads(
            SerialSource(
                url=str(pty.b),
                command="PWR?\r",
                terminator="\r",
                regex=r"P=(?P<value>[\d.]+)W",
                timeout_s=0.5,
            ),
            2,
        )
    finally:
        inst.close()
    assert [s.power_w for s in got] == [1234.5, 1234.5]


def test_no_reply_then_unplugged_then_back(pty: PtyPair) -> None:  # noqa: F811
    src = SerialSource(url=str(pty.b), command="PWR?\n", regex=r"(?P<value>[\d.]+)", timeout_s=0.3)
    inst = Instrument(str(pty.a), lambda req: b"55.0\n" if req == b"PWR?\n" else None)
    holder: dict[str, Instrument] = {"i": inst}

    def between(i: int) -> None:
        if i == 0:
            holder["i"].close()
            pty.stop()  # the adapter is unplugged
        elif i == 1:
            pty.start()  # and back, under the same name
            holder["i"] = Instrument(str(pty.a), lambda req: b"56.0\n" if req == b"PWR?\n" else None)

    try:
        got = reads(src, 6, gap=0.2, between=between)
    finally:
        holder["i"].close()
    assert got[0].power_w == 55.0
    assert got[1].power_w is None and got[1].error is not None
    assert got[-1].power_w == 56.0, got


def test_streaming_status_lines(pty: PtyPair) -> None:  # noqa: F811
    lines = iter([b"STATUS: IDLE\n", b"STATUS: RUN\n"] * 3)

    def stream(_req: bytes) -> bytes | None:
        return next(lines, None)

    inst = Instrument(str(pty.a), stream)
    src = SerialSource(
        url=str(pty.b),
        mode="stream",
        regex=r"STATUS: (?P<value>\w+)",
        value_map={"RUN": "RUNNING", "IDLE": "STANDBY"},
    )
    try:
        got = reads(src, 8, gap=0.15, stale=0.5)
    finally:
        inst.close()
    states = [s.status for s in got if s.status is not None]
    assert State.RUNNING in states
    assert (
        got[-1].status is None
        and got[-1].error is not None
        and "no status line for more than" in got[-1].error
    )


@pytest.fixture
def loop_url() -> Iterator[str]:
    yield "loop://"


def test_modem_status_dry_contact(loop_url: str) -> None:
    async def main() -> list[Sample]:
        d = SerialDriver(SerialSource(url=loop_url, mode="modem", line="CTS"), 30, Clock())
        await d.start()
        closed = await d.read()  # DTR/RTS driven high; the contact (here: loop://) closes RTS onto CTS
        d.port.rts = False  # the instrument's relay opens
        opened = await d.read()
        await d.close()
        return [closed, opened]

    closed, opened = asyncio.run(main())
    assert closed.status is State.RUNNING and opened.status is State.OFF


def test_adapter_found_by_usb_serial_number(pty: PtyPair, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """No USB bus here: the port listing is the one stand-in; it reports the adapter under a new name each time."""
    from types import SimpleNamespace

    from serial.tools import list_ports

    names = iter([str(pty.b), "/dev/ttyUSB-gone"])
    monkeypatch.setattr(
        list_ports,
        "comports",
        lambda: [SimpleNamespace(serial_number="A10K3XYZ", device=next(names, str(pty.b)))],
    )
    inst = Instrument(str(pty.a), lambda req: b"12.5\n" if req == b"PWR?\n" else None)
    try:
        got = reads(SerialSource(url="usb-serial://A10K3XYZ", command="PWR?\n", timeout_s=0.3), 1)
    finally:
        inst.close()
    assert got[0].power_w == 12.5
    monkeypatch.setattr(list_ports, "comports", lambda: [])
    missing = reads(SerialSource(url="usb-serial://A10K3XYZ", command="PWR?\n", timeout_s=0.3), 1)
    assert (
        missing[0].error is not None
        and "no USB serial adapter with serial number 'A10K3XYZ'" in missing[0].error
    )
