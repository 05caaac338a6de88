"""Broker accounts (testcases/accounts/<case>/): each case runs `labmeter collector <args.json>` and gives
either the ACL block it must write (expected_acl.txt) or the error it must stop with (expected_error.txt),
having written nothing. Plus: existing entries survive, concurrent commands lose none, and the ACL an agent
gets is exactly what its mqtt drivers subscribe to."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from labmeter import config
from labmeter.clock import Clock
from labmeter.collector.mosquitto import (
    agent_acl,
    agent_plug_topics,
    collector_acl,
    source_subscriptions,
)
from labmeter.drivers.mqtt import MqttSource
from labmeter.drivers.mqtt.driver import PlugDriver
from labmeter.drivers.registry import agent_config
from tests.conftest import LABMETER

CASES = sorted((Path(__file__).parent / "testcases" / "accounts").iterdir())


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LABMETER, "collector", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_account_case(case: Path, tmp_path: Path) -> None:
    args = [a.replace("{dir}", str(case)) for a in json.loads((case / "args.json").read_text())]
    mq = tmp_path / "mq"
    out = run(*args, "--mosquitto-dir", str(mq))
    assert "Traceback" not in out.stderr
    if (case / "expected_error.txt").exists():
        assert out.returncode == 2, out.stdout
        assert (case / "expected_error.txt").read_text().strip() in out.stderr, out.stderr
        assert not (mq / "acl").exists() and not (mq / "passwd").exists()
        return
    assert out.returncode == 0, out.stderr
    acl = (mq / "acl").read_text()
    assert acl == (case / "expected_acl.txt").read_text()
    user = acl.split("\n", 1)[0].removeprefix("user ")
    [line] = (mq / "passwd").read_text().splitlines()
    assert line.startswith(f"{user}:$7$101$")
    assert (mq / "secrets" / f"{user}.pass").stat().st_mode & 0o777 == 0o600


def test_existing_entries_survive_and_a_replaced_account_is_replaced(tmp_path: Path) -> None:
    mq = tmp_path / "mq"
    mq.mkdir()
    (mq / "acl").write_text(
        "# written by hand\npattern read sensors/%u/#\n\nuser grafana\ntopic read $SYS/#\n"
        "user lab-a\ntopic read tele/#\n\n# keep me\npattern write devices/%c/#"
    )
    (mq / "passwd").write_text("grafana:$7$101$xxx$yyy\nlab-a:$7$101$old$old")
    out = run("broker-user", "lab-a", "--role", "agent", "--mosquitto-dir", str(mq))
    assert out.returncode == 0 and "password kept" in out.stdout
    assert "lab-a:$7$101$old$old" in (mq / "passwd").read_text()  # its ACL follows, its password stays
    assert not (mq / "secrets" / "lab-a.pass").exists()
    assert "user lab-a\ntopic read tele/#" not in (mq / "acl").read_text()
    out = run("broker-user", "lab-a", "--role", "agent", "--new-password", "--mosquitto-dir", str(mq))
    assert out.returncode == 0 and "lab-a.pass" in out.stdout
    assert run("broker-user", "labmeter-collector", "--mosquitto-dir", str(mq)).returncode == 0
    acl = (mq / "acl").read_text()
    for kept in (
        "# written by hand",
        "pattern read sensors/%u/#",
        "user grafana\ntopic read $SYS/#",
        "# keep me",
        "pattern write devices/%c/#",
    ):
        assert kept in acl, kept
    assert "tele/#" not in acl  # lab-a's old block is gone, its new one in its place
    assert agent_acl("lab-a") in acl and collector_acl("labmeter-collector") in acl
    pw = (mq / "passwd").read_text().splitlines()
    assert pw[0] == "grafana:$7$101$xxx$yyy"
    assert [p.split(":")[0] for p in pw] == ["grafana", "lab-a", "labmeter-collector"]
    assert "$old$old" not in (mq / "passwd").read_text()
    assert not [p for p in mq.iterdir() if p.name.startswith(".acl") or p.name.startswith(".passwd")]


def test_commands_run_at_once_lose_no_account(tmp_path: Path) -> None:
    mq = tmp_path / "mq"
    users = [f"plug-{i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(
            pool.map(
                lambda u: run(
                    "plug-user",
                    u,
                    "--format",
                    "esphome",
                    "--topic",
                    f"{u}/sensor/power/state",
                    "--mosquitto-dir",
                    str(mq),
                ),
                users,
            )
        )
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    names = sorted(line.split(":")[0] for line in (mq / "passwd").read_text().splitlines())
    assert names == users
    acl = (mq / "acl").read_text()
    assert all(f"user {u}\ntopic readwrite {u}/#\n" in acl for u in users)


def test_agent_acl_is_what_its_drivers_subscribe_to() -> None:
    """The same table decides both: a driver that changes its topics changes the ACL with it."""
    case = Path(__file__).parent / "testcases" / "accounts" / "agent_reads_exactly_its_six_plugs"
    cfg = config.load(case / "agent.toml", agent_config())
    formats = set()
    for inst in cfg.instrument:
        if not isinstance(inst.source, MqttSource) or inst.source.broker is not None:
            continue
        formats.add(inst.source.format)
        driver = PlugDriver(inst.source, cfg.broker, "t", 30.0, Clock())
        assert {t for t, _q in driver.link.subscriptions} == set(source_subscriptions(inst.source))
    assert len(formats) == 6
    plugs = agent_plug_topics(cfg)
    assert plugs.elsewhere == ("CZ-OWN",)
    assert "tele/other/SENSOR" not in plugs.topics


def test_a_new_folder_is_reachable_whatever_the_umask_and_an_unreachable_one_is_named(tmp_path: Path) -> None:
    import os
    import pwd

    mq = tmp_path / "locked" / "mq"
    (tmp_path / "locked").mkdir(mode=0o700)
    (tmp_path / "locked").chmod(0o700)
    out = subprocess.run(
        [
            "sh",
            "-c",
            'umask 077 && exec "$@"',
            "sh",
            *LABMETER,
            "collector",
            "broker-user",
            "c1",
            "--mosquitto-dir",
            str(mq),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert mq.stat().st_mode & 0o777 == 0o755
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return
    if os.geteuid() == 0:
        assert f"{tmp_path / 'locked'}: the mosquitto user cannot enter it (mode 700)" in out.stderr


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("tele/a/#", "tele/b/#", False),
        ("lab3/#", "lab3/shellyplus-b2/#", True),
        ("esp/#", "esp", True),
        ("zigbee2mqtt/x", "zigbee2mqtt/x/#", True),
        ("zigbee2mqtt/x", "zigbee2mqtt/y", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/b", "a/b/c", False),
    ],
)
def test_filters_overlap(a: str, b: str, overlap: bool) -> None:
    from labmeter.collector.mosquitto import filters_overlap

    assert filters_overlap(a, b) is overlap and filters_overlap(b, a) is overlap


def test_a_plug_cannot_be_given_another_plugs_topics(tmp_path: Path) -> None:
    """An ESPHome node named after a Shelly's prefix would write the Shelly's feed: refused, nothing
    written; the same account run again, or a plug beside it, is fine."""
    mq = tmp_path / "mq"
    shelly = ("--format", "shelly-gen2", "--topic", "lab3/shellyplus-b2/status/switch:0")
    assert run("plug-user", "shelly-b2", *shelly, "--mosquitto-dir", str(mq)).returncode == 0
    before = ((mq / "acl").read_text(), (mq / "passwd").read_text())
    out = run(
        "plug-user",
        "evil",
        "--format",
        "esphome",
        "--topic",
        "lab3/sensor/power/state",
        "--mosquitto-dir",
        str(mq),
    )
    assert out.returncode == 2
    assert (
        "account evil would write lab3/#, where account shelly-b2 writes (lab3/shellyplus-b2/#)" in out.stderr
    )
    assert ((mq / "acl").read_text(), (mq / "passwd").read_text()) == before
    assert run("plug-user", "shelly-b2", *shelly, "--mosquitto-dir", str(mq)).returncode == 0
    ok = run(
        "plug-user",
        "shelly-c3",
        "--format",
        "shelly-gen2",
        "--topic",
        "lab3/shellyplus-c3/status/switch:0",
        "--mosquitto-dir",
        str(mq),
    )
    assert ok.returncode == 0, ok.stderr
