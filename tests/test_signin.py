"""Card-reader sign-ins: a serial instrument streams status and card lines; the agent sends signed sign-ins with
a salted pseudonym, the collector stores and acknowledges them, and the card number never leaves the agent."""

from __future__ import annotations

import hashlib
import stat
import subprocess
import time
from pathlib import Path

from tests.conftest import LABMETER, BrokerProcess
from tests.lab import CollectorThread, agent_process, collector_config, register, wait_for
from tests.support.pty import Instrument, PtyPair, pty  # noqa: F401  (fixture)

CARD = "04A1B2C3D4"


def test_signins_end_to_end(mosquitto: BrokerProcess, pty: PtyPair, tmp_path: Path) -> None:  # noqa: F811
    # the instrument keeps streaming; a card is read every tenth line
    lines = iter([f"CARD:{CARD}\n".encode() if i % 10 == 5 else b"STATUS: RUN\n" for i in range(100_000)])
    inst = Instrument(str(pty.a), lambda _req: (time.sleep(0.05), next(lines, None))[1])
    (tmp_path / "agent.toml").write_text(
        '[agent]\nid = "nmr-pc"\nkey_file = "agent.key"\nstate_dir = "state"\n'
        f'[broker]\nurl = "{mosquitto.url}"\n'
        '[[instrument]]\nid = "CZ-NMR-001"\npoll_s = 0.1\n[instrument.source]\ndriver = "serial"\n'
        f'url = "{pty.b}"\nmode = "stream"\nregex = \'STATUS: (?P<value>\\w+)\'\n'
        'value_map = { RUN = "RUNNING", IDLE = "STANDBY" }\nsignin_regex = \'CARD:(?P<card>[0-9A-F]+)\'\n'
    )
    enroll = subprocess.run(
        [*LABMETER, "agent", "enroll", "-c", "agent.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enroll.returncode == 0, enroll.stderr
    key = next(w for w in enroll.stdout.split() if w.startswith("ed25519:"))
    cfg = collector_config(tmp_path, mosquitto.url)
    from labmeter import signing

    register(cfg, "nmr-pc", key, signing.key_id(signing.parse_public_key(key)), ["CZ-NMR-001"])
    try:
        with CollectorThread(cfg) as ct, agent_process(tmp_path):
            assert ct.collector is not None
            ledger_path = ct.collector.ledger.path

            def signins() -> list[tuple[str, int]]:
                import sqlite3

                db = sqlite3.connect(ledger_path)
                try:
                    return db.execute("SELECT user, seq FROM signins ORDER BY seq").fetchall()
                finally:
                    db.close()

            try:
                wait_for(lambda: len(signins()) >= 2, what="two sign-ins stored")
            except AssertionError:
                raise AssertionError((tmp_path / "agent.log").read_text()[-3000:]) from None
            time.sleep(1.0)
    finally:
        inst.close()
    salt_file = tmp_path / "state" / "signin.salt"
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    user = hashlib.sha256(salt_file.read_bytes() + CARD.encode()).hexdigest()[:32]
    got = signins()
    assert len(got) >= 2 and all(u == user for u, _ in got)
    first = got[0][1]
    assert [seq for _, seq in got] == list(
        range(first, first + len(got))
    )  # a chain of its own, nothing missing
    assert CARD.encode() not in ledger_path.read_bytes()
    import sqlite3

    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0  # acknowledged, sign-ins included
    db.close()
