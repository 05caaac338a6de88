"""The national export against the platform's field list (tests/testcases/national/platform_fields.json),
exact times beside the platform's whole hours, a refused output format, and warnings for thin years."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import import_instruments, import_services
from labmeter.collector.reports.national import national_export, write_national
from labmeter.config import PolicyConfig
from tests.lab import store_schedule

TZ = ZoneInfo("Asia/Shanghai")
POLICY = PolicyConfig()
FIELDS = json.loads((Path(__file__).parent / "testcases" / "national" / "platform_fields.json").read_text())


def t(month: int, day: int, hh: int, mm: int = 0) -> int:
    return int(datetime(2026, month, day, hh, mm, tzinfo=TZ).timestamp() * 1000)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.sqlite")
    (tmp_path / "i.csv").write_text(
        "仪器编号,仪器名称,分类编码,仪器类型,原值（万元）,共享模式\nCZ-A,X射线衍射仪,010301,通用,350,校内外共享\n",
        encoding="utf-8",
    )
    import_instruments(led, tmp_path / "i.csv")
    store_schedule(
        tmp_path,
        led,
        "pc-a",
        "CZ-A",
        [
            (t(12, 1, 0), t(12, 1, 4), "OFF"),
            (t(12, 1, 4), t(12, 1, 5), "RUNNING"),
            (t(12, 1, 5), t(12, 2, 0), "OFF"),
        ],
    )
    rows = "".join(
        f"CZ-A,2026-12-01 04:{m:02d},2026-12-01 04:{m + 3:02d},user{m},某公司,对外,科研,10,委托,XRD 测试\n"
        for m in (5, 8, 11, 14, 17)
    )
    (tmp_path / "s.csv").write_text(
        "仪器编号,开始时间,结束时间,申请人,申请单位,服务类型,服务方向,金额,服务方式,服务内容\n" + rows,
        encoding="utf-8",
    )
    import_services(led, tmp_path / "s.csv", TZ)
    return led


def test_export_has_every_platform_field_with_its_codes(ledger: Ledger) -> None:
    data = national_export(ledger, 2026, POLICY, TZ, "10001", now_ms=t(12, 2, 0))
    for part, spec in (("instruments", FIELDS["instrument"]), ("serviceRecords", FIELDS["service"])):
        envelope = data[part]
        assert set(FIELDS["envelope"]) <= set(envelope) and envelope["instruType"] == spec["instruType"]
        assert envelope["instruList"], part
        for item in envelope["instruList"]:
            missing = set(spec["fields"]) - set(item)
            assert not missing, f"{part}: no {missing}"
            for key, allowed in FIELDS["codes"].items():
                if key in item:
                    assert item[key] in allowed, (key, item[key])
            for key, pattern in FIELDS["patterns"].items():
                if key in item:
                    assert re.match(pattern, str(item[key])), (key, item[key])
            for key in FIELDS["numbers"]:
                if key in item:
                    assert item[key] is None or isinstance(item[key], int | float), key


def test_bookings_within_one_hour_keep_their_exact_times_and_metered_hours(ledger: Ledger) -> None:
    """Five bookings from 04:05 to 04:20 all read 04-05 at the platform's precision; ours tell them apart."""
    data = national_export(ledger, 2026, POLICY, TZ, now_ms=t(12, 2, 0))
    recs = data["serviceRecords"]["instruList"]
    assert {(r["startTime"], r["endTime"]) for r in recs} == {("2026-12-01 04", "2026-12-01 05")}
    assert [r["labmeter"]["start"][11:16] for r in recs] == ["04:05", "04:08", "04:11", "04:14", "04:17"]
    assert all(r["labmeter"]["service_s"] == r["labmeter"]["booked_s"] == 180 for r in recs)
    assert recs[0]["serviceWay"] == "委托" and recs[0]["serviceContent"] == "XRD 测试"
    inst = data["instruments"]["instruList"][0]
    assert inst["serviceMachine"] == 0.2 and inst["labmeter"]["service_s"] == 15 * 60
    assert "precision" in data["meta"]


def test_thin_or_empty_years_warn(ledger: Ledger) -> None:
    empty = national_export(ledger, 2025, POLICY, TZ, now_ms=t(12, 2, 0))
    assert any("no metered data at all in 2025" in w for w in empty["warnings"])
    thin = national_export(ledger, 2026, POLICY, TZ, now_ms=t(12, 2, 0))
    assert any("2026 is not over" in w for w in thin["warnings"])
    assert any(w.startswith("CZ-A: its state is known for only 0%") for w in thin["warnings"])


def test_output_format_follows_the_extension_or_is_refused(ledger: Ledger, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from labmeter.cli import app

    data = national_export(ledger, 2026, POLICY, TZ, now_ms=t(12, 2, 0))
    write_national(data, tmp_path / "n.json")
    assert json.loads((tmp_path / "n.json").read_text())["format"] == "labmeter-national/1"
    (tmp_path / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp_path}"\n')
    res = CliRunner().invoke(
        app,
        [
            "report",
            "national",
            "--year",
            "2026",
            "-o",
            str(tmp_path / "x.csv"),
            "--config",
            str(tmp_path / "collector.toml"),
        ],
    )
    assert (
        res.exit_code == 2
        and "x.csv" in res.output
        and ".json" in res.output
        and "Traceback" not in res.output
    )
    assert not (tmp_path / "x.csv").exists()
    ok = CliRunner().invoke(
        app,
        [
            "report",
            "national",
            "--year",
            "2025",
            "-o",
            str(tmp_path / "y.xlsx"),
            "--config",
            str(tmp_path / "collector.toml"),
        ],
    )
    assert ok.exit_code == 0 and "warning: no metered data at all in 2025" in ok.output
