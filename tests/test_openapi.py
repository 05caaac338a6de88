"""collector/live/openapi.json describes what the live view really answers: a real LiveView over a ledger with
signed intervals, a special instrument, sign-ins and a live agent; every documented path and status code is
requested and each JSON body validated (jsonschema, OpenAPI 3.1 = JSON Schema 2020-12); every route the app
serves under /api or /public/api is documented."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from labmeter import config
from labmeter.collector.ledger import Ledger
from tests.conftest import ROOT
from tests.lab import store_schedule

SPEC = json.loads((ROOT / "collector" / "live" / "openapi.json").read_text(encoding="utf-8"))
H = 3_600_000
TEN_DAYS_AGO = int(time.time() * 1000) - 240 * H

# for each documented path and status: the requests that must produce it
REQUESTS: dict[str, dict[str, list[str]]] = {
    "/api/instruments": {"200": ["/api/instruments"]},
    "/api/overview": {"200": ["/api/overview"]},
    "/api/instruments/{code}": {
        "200": ["/api/instruments/CZ-G", "/api/instruments/CZ-S"],
        "400": ["/api/instruments/CZ*G"],
        "404": ["/api/instruments/NOPE"],
    },
    "/api/instruments/{code}/services": {
        "200": ["/api/instruments/CZ-G/services", "/api/instruments/CZ-S/services?from=0&to=86400000"],
        "400": [
            "/api/instruments/CZ-G/services?from=2026-03-02&to=2026-03-01",
            "/api/instruments/CZ-G/services?to=x",
        ],
        "404": ["/api/instruments/NOPE/services"],
    },
    "/api/instruments/{code}/timeline": {
        "200": ["/api/instruments/CZ-G/timeline", "/api/instruments/CZ-S/timeline?from=0&to=86400000"],
        "400": [
            "/api/instruments/CZ*G/timeline",
            "/api/instruments/CZ-G/timeline?from=2026-03-02&to=2026-03-01",
        ],
        "404": ["/api/instruments/NOPE/timeline"],
    },
    "/api/utilisation": {
        "200": [f"/api/utilisation?by={by}" for by in ("instrument", "unit", "category", "month")]
        + [f"/api/utilisation?from={TEN_DAYS_AGO}"],
        "400": ["/api/utilisation?by=room", "/api/utilisation?from=yesterday"],
    },
    "/api/agents": {"200": ["/api/agents"]},
    "/api/events": {"200": ["/api/events"]},
    "/api/instruments/{code}/signins": {
        "200": ["/api/instruments/CZ-G/signins", "/api/instruments/CZ-G/signins?limit=1"],
        "400": ["/api/instruments/CZ-G/signins?limit=0", "/api/instruments/CZ*G/signins"],
        "404": ["/api/instruments/NOPE/signins"],
    },
    "/public/api/instruments": {
        "200": ["/public/api/instruments"],
        "404": ["PRIVATE:/public/api/instruments"],
    },
    "/public/api/overview": {
        "200": ["/public/api/overview"],
        "404": ["PRIVATE:/public/api/overview"],
    },
    "/api/openapi.json": {"200": ["/api/openapi.json"]},
    "/metrics": {"200": ["/metrics"]},
}


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            if r.headers.get_content_type() == "text/event-stream":
                return r.status, "text/event-stream", r.read(9)
            return r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), e.read()


def schema_for(path: str, status: str) -> tuple[str, dict[str, Any]] | None:
    content = SPEC["paths"][path]["get"]["responses"][status].get("content")
    if not content:
        return None
    ((ctype, media),) = content.items()
    return ctype, {**media["schema"], "components": SPEC["components"]}


@pytest.fixture
def served(tmp_path: Path) -> Any:
    from labmeter.collector.live.web import LiveView
    from labmeter.collector.registry import import_instruments
    from labmeter.collector.service import Collector

    cfg = config.parse(f'[collector]\ndata_dir = "{tmp_path}"\n', config.CollectorConfig)
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    # metering began ten days ago (the registry's date): rated hours are prorated to the metered part
    began = datetime.fromtimestamp(TEN_DAYS_AGO / 1000, UTC).isoformat()
    (tmp_path / "instruments.csv").write_text(
        "code,name,unit,category,kind,rated_hours,metering_start\n"
        f"CZ-G,衍射仪,材料学院,020101,general,,{began}\nCZ-S,电镜,分析测试中心,030201,special,,{began}\n",
        encoding="utf-8",
    )
    import_instruments(ledger, tmp_path / "instruments.csv")
    now = int(time.time() * 1000)
    start = now - now % H - 3 * H
    store_schedule(
        tmp_path,
        ledger,
        "pc-g",
        "CZ-G",
        [(start, start + H, "OFF"), (start + H, start + 2 * H, "RUNNING")],
        energy=lambda a, b: ENERGY_WH[a - start],
    )
    store_schedule(tmp_path, ledger, "pc-s", "CZ-S", [(start, start + 2 * H, "STANDBY")])
    ledger.store_signins(
        [("pc-g", "CZ-G", i, start + i * 60_000, f"user-{i}", f"sha{i}", b"{}") for i in (1, 2, 3)]
    )
    ledger.add_service_records(
        [
            {"instrument": "CZ-G", "start_ms": start + H, "end_ms": start + 2 * H, "service_type": 130}
            | {"applicant": "someone", "applicant_unit": "物理学院", "direction": 135}
        ]
    )
    ledger.close()

    async def main(urls: list[tuple[bool, str]]) -> list[tuple[int, str, bytes]]:
        collector = Collector(cfg)
        collector.live.instruments["CZ-G"] = {
            "instrument": "CZ-G",
            "state": "RUNNING",
            "start": start + 2 * H,
            "power_w": 900.0,
            "agent": "pc-g",
        }
        collector.live.agents["pc-g"] = {"verified": True, "online": True, "received": now, "pending": 0}
        public = LiveView(collector, "127.0.0.1:0", public=True)
        private = LiveView(collector, "127.0.0.1:0")
        await public.start()
        await private.start()
        port, private_port = public.port, private.port
        loop = asyncio.get_running_loop()
        try:
            return [
                await loop.run_in_executor(None, fetch, f"http://127.0.0.1:{private_port if p else port}{u}")
                for p, u in urls
            ]
        finally:
            await public.stop()
            await private.stop()
            collector.ledger.close()

    def run(urls: list[str]) -> list[tuple[int, str, bytes]]:
        split = [(u.startswith("PRIVATE:"), u.removeprefix("PRIVATE:")) for u in urls]
        return asyncio.run(main(split))

    return run


ENERGY_WH = {0: 2.5, H: 900.125}
"""CZ-G's energy per interval (by its start's hour in the schedule); CZ-S has no energy source."""


def test_live_instruments_give_todays_energy_and_public_ones_do_not(served: Any) -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    (_, _, private), (_, _, public) = served(["PRIVATE:/api/instruments", "/public/api/instruments"])
    now = int(time.time() * 1000)
    start = now - now % H - 3 * H
    midnight = int(
        datetime.fromtimestamp(now / 1000, ZoneInfo("Asia/Shanghai"))
        .replace(hour=0, minute=0, second=0, microsecond=0)
        .timestamp()
        * 1000
    )
    # each interval is a whole hour, so it is in today or not (the policy's zone is Asia/Shanghai)
    want = sum(wh for at, wh in ENERGY_WH.items() if start + at >= midnight)
    rows = {i["code"]: i for i in json.loads(private)["instruments"]}
    assert (rows["CZ-G"].get("today") or {}).get("energy_wh") == (want or None)
    assert rows["CZ-G"]["year"]["energy_wh"] == sum(ENERGY_WH.values())
    assert rows["CZ-S"]["year"]["energy_wh"] is None  # no energy source: unknown, not 0
    assert all("energy_wh" not in (i.get("year") or {}) for i in json.loads(public)["instruments"])


def _from_rows(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The overview's rows back into the list's shape, as the page does ("today.run_s" is today's run_s)."""
    out: dict[str, dict[str, Any]] = {}
    for row in body["rows"]:
        item: dict[str, Any] = {}
        for column, value in zip(body["columns"], row, strict=True):
            head, _, key = column.partition(".")
            if key:
                item.setdefault(head, {})[key] = value
            else:
                item[head] = value
        out[item["code"]] = item
    return out


def test_the_overview_gives_the_lists_values(served: Any) -> None:
    """The page reads /api/overview; whoever reads /api/instruments must see the same instruments."""
    answers = served(
        [
            "PRIVATE:/api/instruments",
            "PRIVATE:/api/overview",
            "/public/api/instruments",
            "/public/api/overview",
        ]
    )
    bodies = [json.loads(body) for _, _, body in answers]
    for listed, overview in ((bodies[0], bodies[1]), (bodies[2], bodies[3])):
        rows = _from_rows(overview)
        assert set(rows) == {i["code"] for i in listed["instruments"]} == {"CZ-G", "CZ-S"}
        for item in listed["instruments"]:
            got = rows[item["code"]]
            for key, value in got.items():
                if isinstance(value, dict):
                    assert value == {k: item[key][k] for k in value}, (item["code"], key)
                else:
                    assert value == item[key], (item["code"], key)
    private, public = _from_rows(bodies[1]), _from_rows(bodies[3])
    assert private["CZ-G"]["agent_status"] == "up" and private["CZ-G"]["state"] == "RUNNING"
    assert private["CZ-S"]["agent_status"] == "down" and private["CZ-S"]["state"] == "UNKNOWN"
    assert private["CZ-G"]["year"]["energy_wh"] == sum(ENERGY_WH.values())
    # what the public list leaves out, the public rows leave out
    assert not {"agent", "agent_status", "error", "last_state", "power_w"} & set(public["CZ-G"])
    assert "energy_wh" not in public["CZ-G"]["year"] and "hours_at" not in bodies[3]


def test_every_documented_response_matches_its_schema(served: Any) -> None:
    assert set(REQUESTS) == set(SPEC["paths"]), "a documented path has no request here, or the reverse"
    cases = [
        (path, status, url)
        for path, by_status in REQUESTS.items()
        for status, urls in by_status.items()
        for url in urls
    ]
    for path, status in {(p, s) for p, s, _ in cases}:
        assert status in SPEC["paths"][path]["get"]["responses"], f"{path} {status} is not documented"
    answers = served([url for _, _, url in cases])
    checked = 0
    for (path, status, url), (got, ctype, body) in zip(cases, answers, strict=True):
        assert str(got) == status, (url, got, body[:300])
        expected = schema_for(path, status)
        if expected is None:
            continue
        want_type, schema = expected
        assert ctype == want_type, (url, ctype)
        if want_type == "text/event-stream":
            assert body.startswith(b": hello"), body
            continue
        if want_type == "text/plain":  # Prometheus exposition (tests/test_metrics.py reads it)
            assert b"# TYPE labmeter_" in body, body[:300]
            continue
        jsonschema.Draft202012Validator(schema).validate(json.loads(body))
        checked += 1
    assert checked >= 15
    by_url = dict(zip([u for _, _, u in cases], answers, strict=True))
    signins = json.loads(by_url["/api/instruments/CZ-G/signins"][2])["signins"]
    assert [s["user"] for s in signins] == ["user-3", "user-2", "user-1"]  # newest first, all three
    # ten days (and however long the suite ran since this module was imported: the period ends now) of rated
    # hours, metering having begun then: the special instrument gets the policy's 800 h a year, the general
    # one 1400 h
    period_h = (time.time() * 1000 - TEN_DAYS_AGO) / H
    rows = {r["key"]: r for r in json.loads(by_url[f"/api/utilisation?from={TEN_DAYS_AGO}"][2])["rows"]}
    assert rows["CZ-S"]["rated_h"] == pytest.approx(800 * period_h / 8760, abs=0.01)
    assert rows["CZ-G"]["rated_h"] == pytest.approx(1400 * period_h / 8760, abs=0.01)
    assert rows["CZ-G"]["run_h"] == 1.0
    (record,) = json.loads(by_url["/api/instruments/CZ-G/services"][2])["services"]
    assert record["service_type"] == 130 and "applicant" not in record  # no names
    one = json.loads(by_url["/api/instruments/CZ-G"][2])["instrument"]
    assert one["agent_status"] == "up" and one["state"] == "RUNNING" and one["today"]["provisional_run_s"] > 0
    assert json.loads(by_url["/api/instruments/CZ-S"][2])["instrument"]["agent_status"] == "down"


def test_schemas_are_not_vacuous() -> None:
    """A body missing a field, or with one it must not have (power on the public view), fails validation."""
    inst = schema_for("/public/api/instruments", "200")
    assert inst is not None
    validator = jsonschema.Draft202012Validator(inst[1])
    row = {"code": "A", "name": "", "unit": "", "category": "", "state": "OFF", "since": None}
    row |= {"today": None, "month": None, "year": None}
    validator.validate({"now": 1, "tz": "UTC", "instruments": [row]})
    assert not validator.is_valid({"now": 1, "tz": "UTC", "instruments": [{**row, "error": "x"}]})
    assert not validator.is_valid({"now": 1, "tz": "UTC", "instruments": [{**row, "state": "ON"}]})
    agents = schema_for("/api/agents", "200")
    assert agents is not None
    assert not jsonschema.Draft202012Validator(agents[1]).is_valid({"agents": [{"agent": "x"}]})


def test_every_served_route_is_documented(tmp_path: Path) -> None:
    from labmeter.collector.live.web import LiveView
    from labmeter.collector.service import Collector

    cfg = config.parse(f'[collector]\ndata_dir = "{tmp_path}"\n', config.CollectorConfig)
    collector = Collector(cfg)
    try:
        app = LiveView(collector, "127.0.0.1:1", public=True).app()
        routes = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    finally:
        collector.ledger.close()
    api = {r for r in routes if r.startswith(("/api/", "/public/api/", "/metrics"))}
    assert api == set(SPEC["paths"])
