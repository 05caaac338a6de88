"""The agent's log at the default level: a meter that stops answering is a few lines, not one per poll
(and no pymodbus hex dumps), it says when the meter reads again; lines are stamped in local time with the
UTC offset."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest
from pyModbusTCP.server import ModbusServer

from labmeter import log
from tests.conftest import LABMETER, BrokerProcess, free_port
from tests.lab import wait_for
from tests.support.modbus import words


class SwitchablePort:
    """A meter's TCP port, ``silent`` (accepts and never answers: a meter gone quiet behind a gateway)
    or ``closed`` (nothing listens), until ``answer()``: then connections reach a real Modbus server."""

    def __init__(self, target_port: int, mode: str = "silent") -> None:
        self.target = target_port
        self.port = free_port()
        self.answering = threading.Event()
        self.held: list[socket.socket] = []
        self.accepted = 0
        self.sock: socket.socket | None = None
        if mode == "silent":
            self._listen()

    def _listen(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def answer(self) -> None:
        self.answering.set()
        if self.sock is None:
            self._listen()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            self.accepted += 1
            if not self.answering.is_set():
                self.held.append(conn)  # read nothing, answer nothing
                continue
            up = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(4096):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture(params=["silent", "closed"])
def meter(request: pytest.FixtureRequest) -> Iterator[tuple[ModbusServer, SwitchablePort]]:
    port = free_port()
    server = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    server.data_bank.set_input_registers(0x000C, words(850.0))
    server.start()
    switch = SwitchablePort(port, request.param)
    yield server, switch
    switch.close()
    server.stop()


SILENT_S = 25.0


def agent_config(tmp_path: Path, broker: BrokerProcess, port: int) -> None:
    (tmp_path / "agent.toml").write_text(
        '[agent]\nid = "lab-s"\nkey_file = "agent.key"\nstate_dir = "state"\n'
        f'[broker]\nurl = "{broker.url}"\n'
        '[[instrument]]\nid = "CZ-S"\npoll_s = 0.2\n[instrument.source]\ndriver = "modbus"\n'
        f'url = "tcp://127.0.0.1:{port}"\nprofile = "eastron-sdm120"\ntimeout_s = 0.3\n'
        "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
    )


def test_a_silent_meter_is_a_few_lines_and_its_recovery_one(
    meter: tuple[ModbusServer, SwitchablePort], tmp_path: Path
) -> None:
    """Silent (every read times out) or closed (every connect is refused, with backoff)."""
    _server, switch = meter
    broker = BrokerProcess("builtin", tmp_path)
    broker.start()
    agent_config(tmp_path, broker, switch.port)
    subprocess.run(
        [*LABMETER, "agent", "enroll", "-c", "agent.toml"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    logfile = tmp_path / "agent.log"
    with logfile.open("wb") as err:
        agent = subprocess.Popen(
            [*LABMETER, "agent", "run", "-c", "agent.toml"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        time.sleep(SILENT_S)
        switch.answer()
        wait_for(lambda: "reading again" in logfile.read_text(), timeout=20, what="the recovery line")
        time.sleep(1.0)
    finally:
        agent.terminate()
        agent.wait(20)
        broker.stop()
    text = logfile.read_text()
    lines = text.splitlines()
    episode = [ln for ln in lines if "CZ-S" in ln or "pymodbus" in ln]
    assert len(episode) <= 4, text  # the silence, the library's one line, the recovery
    assert "0x" not in text and ">>>>>" not in text and "Traceback" not in text, text
    [again] = [ln for ln in lines if "reading again" in ln]
    m = re.search(r"CZ-S: reading again after (\d+) s \((\d+) failed reads\)", again)
    assert m is not None, again
    # the meter really was polled, and failed, all along
    assert SILENT_S - 3 <= int(m.group(1)) <= SILENT_S + 15 and int(m.group(2)) >= 20, again
    assert len(lines) <= 9, text  # the whole log: start-up, the episode, shutdown


def test_verbose_shows_every_library_message(tmp_path: Path) -> None:
    """What the default level leaves out is there under --verbose: the filter, not luck, kept it short."""
    silent = SwitchablePort(free_port(), "silent")
    broker = BrokerProcess("builtin", tmp_path)
    broker.start()
    agent_config(tmp_path, broker, silent.port)
    subprocess.run(
        [*LABMETER, "agent", "enroll", "-c", "agent.toml"], cwd=tmp_path, check=True, capture_output=True
    )
    logfile = tmp_path / "agent.log"
    with logfile.open("wb") as err:
        agent = subprocess.Popen(
            [*LABMETER, "agent", "run", "-c", "agent.toml", "--verbose"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for(lambda: logfile.read_text().count("No response received") >= 5, timeout=30, what="details")
    finally:
        agent.terminate()
        agent.wait(20)
        broker.stop()
        silent.close()
    assert "0x" in logfile.read_text()  # the request, in hex


def test_library_messages_once_per_episode_and_first_line_only() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(log.formatter())
    handler.addFilter(log.LibraryEpisodes(repeat_s=600))
    lib = logging.getLogger("pymodbus.logging")
    ours = logging.getLogger("labmeter.test")
    gm = logging.getLogger("labmeter.mqtt.gmqtt")
    for lg in (lib, ours, gm):
        lg.addHandler(handler)
        lg.propagate = False
    try:
        for _ in range(100):
            lib.error("No response received after 0 retries\n>>>>> send: 0x0 0x1 0x0")
        lib.error("Connection to (%s, %d) failed: %s", "127.0.0.1", 502, "refused")
        lib.error("Connection to (%s, %d) failed: %s", "127.0.0.1", 502, "refused")
        for _ in range(20):  # gmqtt, under the logger labmeter.mqtt gives it, at every reconnect
            gm.error("[MqttPackageHandler] CONNACK 0x5 is permanent, not reconnecting")
        for _ in range(3):
            ours.warning("ours is never filtered")
    finally:
        for lg in (lib, ours, gm):
            lg.removeHandler(handler)
            lg.propagate = True
    lines = out.getvalue().splitlines()
    assert sum("No response received" in ln for ln in lines) == 1
    assert sum("failed: refused" in ln for ln in lines) == 1
    assert sum("ours is never filtered" in ln for ln in lines) == 3
    assert sum("CONNACK 0x5" in ln for ln in lines) == 1
    assert not any(">>>>>" in ln for ln in lines)
    assert len(lines) == 6


def test_library_filter_memory_is_bounded() -> None:
    f = log.LibraryEpisodes()
    for i in range(10_000):
        f.filter(logging.LogRecord("gmqtt", logging.ERROR, __file__, 1, f"message {i}", None, None))
    assert len(f._seen) <= log.MAX_KEYS


def test_log_lines_are_local_time_with_the_offset() -> None:
    env = {**os.environ, "TZ": "Asia/Shanghai"}
    code = (
        "import logging; from labmeter import log; log.setup();"
        "logging.getLogger('labmeter.x').warning('hello')"
    )
    out = subprocess.run([LABMETER[0], "-c", code], env=env, capture_output=True, text=True, timeout=30)
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\+0800 WARNING labmeter.x: hello", out.stderr)
    assert m is not None, out.stderr
    from datetime import datetime, timedelta, timezone

    stamped = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone(timedelta(hours=8)))
    assert abs((stamped - datetime.now(UTC)).total_seconds()) < 60


def test_status_is_in_local_time_with_the_offset(tmp_path: Path) -> None:
    """The same outbox read in Shanghai and in UTC: the same instants, each in its zone, offset shown."""
    import sqlite3

    from labmeter.agent.outbox import AgentStore

    (tmp_path / "agent.toml").write_text(
        '[agent]\nid = "lab-t"\nkey_file = "agent.key"\nstate_dir = "state"\n'
        '[[instrument]]\nid = "CZ-T"\n[instrument.source]\ndriver = "modbus"\nurl = "tcp://127.0.0.1:1"\n'
        'profile = "eastron-sdm120"\n'
        "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
    )
    AgentStore(tmp_path / "state" / "agent.db").close()
    first_ms = 1_767_225_600_000  # 2026-01-01 00:00 UTC
    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    db.execute("INSERT INTO chain VALUES ('CZ-T', ?, 'h', ?)", (first_ms + 9, first_ms))
    db.execute(
        "INSERT INTO outbox (instrument, seq, topic, payload, body_sha, created_at) VALUES "
        "('CZ-T', ?, 't', x'00', 's', ?)",
        (first_ms + 9, first_ms / 1000 + 3723),  # 01:02:03 UTC
    )
    db.execute(
        "INSERT INTO dead (instrument, seq, topic, payload, body_sha, reason, at) VALUES "
        "('CZ-T', ?, 't', x'00', 's', 'unknown agent', ?)",
        (first_ms + 1, first_ms / 1000 + 7384),  # 02:03:04 UTC
    )
    db.commit()
    db.close()

    def status(tz: str) -> str:
        out = subprocess.run(
            [*LABMETER, "agent", "status", "-c", "agent.toml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TZ": tz},
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    shanghai, utc = status("Asia/Shanghai"), status("UTC")
    assert "(times are local, UTC+0800)" in shanghai and "(times are local, UTC+0000)" in utc
    assert "since 2026-01-01 08:00 +0800" in shanghai and "since 2026-01-01 00:00 +0000" in utc
    assert "oldest from 2026-01-01 09:02:03 +0800" in shanghai
    assert "oldest from 2026-01-01 01:02:03 +0000" in utc
    assert "at 2026-01-01 10:03:04 +0800: unknown agent" in shanghai
    assert "at 2026-01-01 02:03:04 +0000: unknown agent" in utc
