"""Bad imports are rejected row by row with clear messages, and nothing is half-imported."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from openpyxl import Workbook

from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import ImportError_, import_instruments, import_services

TZ = ZoneInfo("Asia/Shanghai")


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.sqlite")
    (tmp_path / "i.csv").write_text("code,name,unit,kind\nCZ-A,XRD,Materials,general\n")
    import_instruments(led, tmp_path / "i.csv")
    return led


def count(led: Ledger) -> int:
    return int(led.db.execute("SELECT count(*) FROM service_records").fetchone()[0])


def test_bad_service_rows_are_all_named_and_nothing_is_imported(ledger: Ledger, tmp_path: Path) -> None:
    f = tmp_path / "s.csv"
    f.write_text(
        "instrument,start,end,applicant,service_type\n"
        "CZ-A,2026-03-02 08:00,2026-03-02 09:00,ok,120\n"
        "CZ-A,2026-03-02 25:00,2026-03-02 09:00,bad time,120\n"
        "CZ-X,2026-03-02 08:00,2026-03-02 09:00,unknown,120\n"
        "CZ-A,2026-03-02 10:00,2026-03-02 09:00,backwards,130\n"
        "CZ-A,2026-03-02 10:00,2026-03-02 11:00,bad type,140\n"
    )
    with pytest.raises(ImportError_) as err:
        import_services(ledger, f, TZ)
    msg = str(err.value)
    assert "s.csv: row 3: column 'start': cannot read '2026-03-02 25:00' as a time" in msg
    assert "s.csv: row 4: column 'instrument': unknown instrument 'CZ-X'" in msg
    assert "s.csv: row 5: column 'end': '2026-03-02 09:00' is not after start '2026-03-02 10:00'" in msg
    assert "s.csv: row 6: column 'service_type': '140' is not 120/internal or 130/external" in msg
    assert "row 2" not in msg
    assert "nothing imported (4 problem(s))" in msg
    assert count(ledger) == 0


def test_missing_column_is_named(ledger: Ledger, tmp_path: Path) -> None:
    f = tmp_path / "s.csv"
    f.write_text("instrument,start,applicant,service_type\nCZ-A,2026-03-02 08:00,x,120\n")
    with pytest.raises(ImportError_, match=r"missing column\(s\): end"):
        import_services(ledger, f, TZ)


def test_instrument_sheet_xlsx_and_reimport_updates(ledger: Ledger, tmp_path: Path) -> None:
    wb = Workbook()
    ws = wb.active
    ws.append(["仪器编号", "仪器名称", "管理单位", "分类编码", "仪器类型", "原值（万元）", "定额机时"])
    ws.append(["CZ-A", "X射线衍射仪", "材料学院", "020101", "通用", 350, None])
    ws.append(["CZ-B", "电镜", "分析测试中心", "030201", "专用", 680.5, 1000])
    wb.save(tmp_path / "i.xlsx")
    assert import_instruments(ledger, tmp_path / "i.xlsx") == 2
    got = {i["code"]: i for i in ledger.instruments()}
    assert got["CZ-A"]["name"] == "X射线衍射仪" and got["CZ-A"]["category"] == "020101"
    assert (
        got["CZ-B"]["kind"] == "special"
        and got["CZ-B"]["rated_hours"] == 1000
        and got["CZ-B"]["value_wan"] == 680.5
    )


def test_bad_instrument_sheet(ledger: Ledger, tmp_path: Path) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(
        "code,kind,category,rated_hours\nCZ-C,general,1234,\n,general,,\nCZ-D,sometimes,,x\nCZ-C,general,,\n"
    )
    with pytest.raises(ImportError_) as err:
        import_instruments(ledger, f)
    msg = str(err.value)
    assert "row 2: column 'category': '1234' is not a 6-digit category code" in msg
    assert "row 3: column 'code': empty" in msg
    assert "row 4: column 'kind': 'sometimes' is not general/通用 or special/专用" in msg
    assert "row 4: column 'rated_hours': 'x' is not a number" in msg
    assert "row 5: column 'code': 'CZ-C' appears twice in the file" in msg
    assert {i["code"] for i in ledger.instruments()} == {"CZ-A"}


def test_icalendar_bookings(ledger: Ledger, tmp_path: Path) -> None:
    ics = tmp_path / "xrd.ics"
    ics.write_text(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//booking//EN\r\n"
        "BEGIN:VEVENT\r\nUID:1\r\nDTSTART;TZID=Asia/Shanghai:20260302T080000\r\n"
        "DTEND;TZID=Asia/Shanghai:20260302T093000\r\nSUMMARY:张三\r\nCATEGORIES:external,research\r\nEND:VEVENT\r\n"
        "BEGIN:VEVENT\r\nUID:2\r\nDTSTART:20260303T020000Z\r\nDTEND:20260303T030000Z\r\nSUMMARY:李四\r\n"
        "CATEGORIES:120\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    res = import_services(ledger, ics, TZ, instrument="CZ-A")
    assert (res.added, res.duplicates) == (2, 0)
    rows = ledger.db.execute(
        "SELECT applicant, service_type, direction, end_ms - start_ms FROM service_records ORDER BY start_ms"
    ).fetchall()
    assert rows == [("张三", 130, 135, 90 * 60_000), ("李四", 120, 138, 3_600_000)]
    assert import_services(ledger, ics, TZ, instrument="CZ-A").duplicates == 2
