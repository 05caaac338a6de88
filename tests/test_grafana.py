"""The shipped Grafana dashboard reads what the sink writes (measurement and field names kept in one place)."""

from __future__ import annotations

import json
import re

from labmeter.collector.sink_influx import STATE_CODE
from tests.conftest import ROOT


def test_dashboard_queries_match_the_sink() -> None:
    dash = json.loads((ROOT / "config" / "grafana" / "labmeter-dashboard.json").read_text())
    queries = [t["query"] for p in dash["panels"] for t in p["targets"]]
    fields = {
        (m, f) for q in queries for m, f in re.findall(r'_measurement == "(\w+)" and r._field == "(\w+)"', q)
    }
    assert fields == {
        ("labmeter_usage", "effective_s"),
        ("labmeter_usage", "run_s"),
        ("labmeter_state", "state_code"),
        ("labmeter_usage", "unknown_s"),
    }
    mapping = dash["panels"][2]["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {int(k): v["text"] for k, v in mapping.items()} == {v: k for k, v in STATE_CODE.items()}
    assert {p["title"].split(" (")[0] for p in dash["panels"]} >= {
        "Effective hours per instrument",
        "State timeline",
    }
