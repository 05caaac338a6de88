"""The shipped Grafana dashboards read what the sink writes: the MetricsQL one run panel by panel against
VictoriaMetrics (default flags) returns what the ledger predicts; the Flux one names only measurements, fields and
tags the sink writes (no InfluxDB server is installable here, so its queries are checked, not run)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from labmeter.collector.ledger.rollup import direct
from labmeter.collector.reports.hours import YEAR_MS, rated_ms
from labmeter.collector.sink_influx import SERIES, STATE_CODE, InfluxSink
from labmeter.config import InfluxConfig
from tests.conftest import ROOT
from tests.victoria import DAY, POLICY, H, Victoria, needs_vm, setup_ledger, state_at, store, t, vm

__all__ = ["vm"]  # the fixture
GRAFANA = ROOT / "config" / "grafana"
DASHBOARDS = {"labmeter-victoriametrics.json": "prometheus", "labmeter-influxdb.json": "influxdb"}
DAY_S = 86_400


def load(name: str) -> dict[str, Any]:
    return json.loads((GRAFANA / name).read_text(encoding="utf-8"))


def queries(dash: dict[str, Any]) -> dict[str, list[str]]:
    """Panel title -> its queries (MetricsQL ``expr`` or Flux ``query``)."""
    return {p["title"]: [tg.get("expr") or tg["query"] for tg in p["targets"]] for p in dash["panels"]}


def panel(dash: dict[str, Any], starts: str) -> dict[str, Any]:
    (found,) = [p for p in dash["panels"] if p["title"].startswith(starts)]
    return found


@pytest.mark.parametrize("name", DASHBOARDS)
def test_import_asks_for_the_data_source_and_every_panel_names_it(name: str) -> None:
    dash = load(name)
    (inp,) = dash["__inputs"]
    assert inp["type"] == "datasource" and inp["pluginId"] == DASHBOARDS[name]
    want = {"type": DASHBOARDS[name], "uid": "${" + inp["name"] + "}"}
    for p in dash["panels"]:
        assert p["datasource"] == want, p["title"]
        assert p["targets"] and all(tg["datasource"] == want for tg in p["targets"]), p["title"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"] == want, var["name"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_both_dashboards_have_the_panels_operators_ask_for() -> None:
    titles = [[p["title"] for p in load(n)["panels"]] for n in DASHBOARDS]
    assert titles[0] == titles[1]
    for wanted in (
        "Utilisation per instrument",
        "Utilisation per unit",
        "State timeline",
        "Power",
        "Energy per instrument",
        "Unknown time",
        "Agents down",
    ):
        assert any(x.startswith(wanted) for x in titles[0]), wanted
    for name in DASHBOARDS:
        mapping = panel(load(name), "State timeline")["fieldConfig"]["defaults"]["mappings"][0]["options"]
        assert {int(k): v["text"].split()[0] for k, v in mapping.items()} == {
            v: k for k, v in STATE_CODE.items()
        }


def test_flux_queries_name_only_what_the_sink_writes() -> None:
    dash = load("labmeter-influxdb.json")
    seen: set[tuple[str, str]] = set()
    for title, qs in queries(dash).items():
        for q in qs:
            pairs = re.findall(r'r\._measurement == "(\w+)" and r\._field == "(\w+)"', q)
            assert pairs, title
            for m, f in pairs:
                assert m in SERIES and f in SERIES[m][0], (title, m, f)
            seen |= set(pairs)
            tags = {tag for m, _ in pairs for tag in SERIES[m][1]}
            used = {x for x in re.findall(r"\br\.(\w+)", q) if not x.startswith("_")}
            assert used <= tags, (title, used - tags)
            columns = {
                c for group in re.findall(r"columns: \[([^\]]*)\]", q) for c in re.findall(r'"(\w+)"', group)
            }
            assert columns <= tags | {"_time", "_value"}, (title, columns)
            assert q.count("(") == q.count(")") and q.count("{") == q.count("}"), title
            assert 'from(bucket: "${bucket}")' in q, title
    assert ("labmeter_usage", "effective_s") in seen and ("labmeter_state", "code") in seen
    assert ("labmeter_power", "mean_w") in seen and ("labmeter_agent", "up") in seen


def test_metricsql_names_only_series_the_sink_writes() -> None:
    names = {f"{m}_{f}" for m, (fields, _) in SERIES.items() for f in fields}
    for title, qs in queries(load("labmeter-victoriametrics.json")).items():
        for q in qs:
            used = set(re.findall(r"\b(labmeter_\w+)", q))
            assert used and used <= names, (title, used - names)


def substitute(expr: str, instrument: str = ".*", range_s: int = DAY_S) -> str:
    """Grafana's template and global variables, as Grafana fills them in."""
    out = expr.replace("$__range_s", str(range_s)).replace("$__range", f"{range_s}s")
    return out.replace("$instrument", instrument).replace("$unit", ".*")


def approx(got: dict[str, float], want: dict[str, float], rel: float = 1e-9) -> None:
    assert set(got) == set(want), (got, want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=1e-9), k


POWER = {"STANDBY": 150.0, "RUNNING": 1200.0, "OFF": 0.8, "UNKNOWN": 0.0}


@needs_vm
def test_every_metricsql_panel_returns_what_the_ledger_predicts(vm: Victoria, tmp_path: Path) -> None:
    ledger, day = setup_ledger(tmp_path)
    dash = load("labmeter-victoriametrics.json")
    checked: set[str] = set()
    now = [t(2, 12, 30)]
    store(ledger, [iv for rows in day.values() for iv in rows if iv.end_ms <= now[0]])
    power_from, power_to = t(2, 8, 30), t(2, 9, 30)

    async def main() -> None:
        sink = InfluxSink(
            InfluxConfig(url=vm.url), ledger, POLICY, settle_ms=0, reset_every_s=0, now_ms=lambda: now[0]
        )
        # the live stream as the collector hands it over: state changes and power windows
        for code, (agent, spans) in DAY.items():
            for start, end, state in spans:
                if start < now[0]:
                    sink.on_live(
                        "state", {"agent": agent, "instrument": code, "state": state, "start": start}
                    )
                for w in range(max(start, power_from), min(end, power_to), 60_000):
                    body = {"agent": agent, "instrument": code, "start": w, "end": w + 60_000, "n": 60}
                    level = POWER[state]
                    sink.on_live(
                        "power",
                        {
                            **body,
                            "mean_w": level,
                            "min_w": level * 0.98,
                            "max_w": level * 1.02,
                            "energy_wh": round(level / 60, 6),  # as the agent rounds it
                        },
                    )
        await sink.flush()
        checked.add(panel(dash, "Effective time not yet final")["title"])
        pending = panel(dash, "Effective time not yet final")["targets"][0]["expr"]
        got = vm.query(substitute(pending), now[0])
        want = {code: h.effective_ms / H for code, h in direct(ledger, t(2, 12), t(2, 13), POLICY).items()}
        approx(got, want)
        # the rest of the day, the night after it; one agent's connection is lost
        now[0] = t(3, 2)
        store(ledger, [iv for rows in day.values() for iv in rows])
        sink.on_live("agent", {"agent": "pc-a", "online": True})
        sink.on_live("agent", {"agent": "pc-b", "online": False})
        sink.on_live("agent", {"agent": "intruder", "online": False})  # not a registered agent: ignored
        await sink.flush()
        await sink.close()

    asyncio.run(main())
    a, b = t(2, 0), t(3, 0)
    truth = direct(ledger, a, b, POLICY)
    info = {str(i["code"]): i for i in ledger.instruments()}
    rated = {code: rated_ms(info[code], POLICY, b - a) for code in truth}
    units: dict[str, list[str]] = {}
    for code in truth:
        units.setdefault(str(info[code]["unit"]), []).append(code)

    def instant(title: str, instrument: str = ".*", at: int = b) -> dict[str, float]:
        checked.add(panel(dash, title)["title"])
        (target,) = panel(dash, title)["targets"]
        assert target["instant"]
        return vm.query(substitute(target["expr"], instrument), at)

    # the report rounds rated time to the millisecond; the dashboard prorates exactly
    approx(
        instant("Utilisation per instrument"), {c: h.effective_ms / rated[c] for c, h in truth.items()}, 1e-6
    )
    approx(
        instant("Utilisation per unit"),
        {u: sum(truth[c].effective_ms for c in cs) / sum(rated[c] for c in cs) for u, cs in units.items()},
        1e-6,
    )
    approx(instant("Effective hours"), {c: h.effective_ms / H for c, h in truth.items()})
    approx(instant("Run hours"), {c: h.run_ms / H for c, h in truth.items()})
    approx(instant("Run hours", "CZ-XRD-001"), {"CZ-XRD-001": truth["CZ-XRD-001"].run_ms / H})
    approx(instant("Unknown time"), {c: (h.unknown_ms + h.unverified_ms) / H for c, h in truth.items()})
    approx(instant("Agents down", at=t(3, 2)), {"pc-b": 0.0})
    for at in (t(2, 10, 30), t(2, 15), t(2, 23, 30)):
        running = sum(state_at(c, at) == "RUNNING" for c in DAY)
        approx(instant("Running now", at=at), {"": float(running)})

    checked |= {panel(dash, "State timeline")["title"], panel(dash, "Power")["title"]}
    (timeline,) = panel(dash, "State timeline")["targets"]
    series = vm.query_range(substitute(timeline["expr"]), a, b - 1, 300)
    assert set(series) == set(DAY)
    for code, points in series.items():
        assert len(points) == DAY_S // 300
        for ts, v in points.items():
            assert v == STATE_CODE[str(state_at(code, ts))], (code, ts)

    mean, top = panel(dash, "Power")["targets"]
    for target, factor in ((mean, 1.0), (top, 1.02)):
        curves = vm.query_range(substitute(target["expr"]), power_from + 30_000, power_to - 30_000, 60)
        assert set(curves) == set(DAY)
        for code, points in curves.items():
            for ts, v in points.items():
                assert v == pytest.approx(POWER[str(state_at(code, ts - ts % 60_000))] * factor), (code, ts)
    kwh: dict[str, float] = {}
    for code, (_agent, spans) in DAY.items():
        for start, end, state in spans:
            n = len(range(max(start, power_from), min(end, power_to), 60_000))
            if n:
                kwh[code] = kwh.get(code, 0.0) + n * round(POWER[state] / 60, 6) / 1000
    approx(instant("Energy per instrument"), kwh, 1e-9)
    assert checked == {p["title"] for p in dash["panels"]}, "every panel is run"
    ledger.close()
    assert YEAR_MS == 365 * 86_400_000  # the dashboards prorate rated hours by 31536000 s
