"""No password or token reaches a log line or an error message: URLs are redacted where they are shown
(testcases/secrets/urls.json), the log formatter masks what slipped past, and a secret file that is
empty or unreadable stops start-up naming the file, without a traceback. The error paths are
exercised with failing connections, in-process (caplog) and in a real ``labmeter`` process."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from labmeter import config, log
from labmeter.collector.ledger import Ledger, LedgerError
from labmeter.netutil import free_port, redact_text, redact_url, url_secrets
from tests.conftest import LABMETER
from tests.lab import store_schedule, wait_for

URLS = json.loads((Path(__file__).parent / "testcases" / "secrets" / "urls.json").read_text())["cases"]
SECRET = "pw-Qx7Zk9"  # the password in the URLs below; no output may contain it


@pytest.mark.parametrize(("url", "shown"), URLS, ids=[u for u, _ in URLS])
def test_url_is_shown_without_its_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "refused" in redact_text(f"cannot connect to {url}: refused", url)
    for secret in url_secrets(url):  # a driver may quote the password on its own, decoded
        assert secret not in redact_text(f"cannot connect to {url}: password {secret!r} refused", url)
    assert url_secrets(url) or url == shown
    assert "secret" not in redact_url(url).replace("client_secret", ""), "every case's password is 'secret'"


def closed_port_ledgers() -> list[str]:
    port = free_port()  # nothing listens there: every connection fails
    return [
        f"postgresql://labmeter:{SECRET}@127.0.0.1:{port}/db",
        f"postgresql://labmeter@127.0.0.1:{port}/db?password={SECRET}&sslmode=disable",
        f"postgresql://labmeter@127.0.0.1:{port}/db?sslmode=disable&sslpassword={SECRET}",
    ]


@pytest.mark.parametrize("url", closed_port_ledgers(), ids=["userinfo", "query", "sslpassword"])
def test_ledger_password_in_no_error_or_log_line(url: str, tmp_path: Path, caplog: Any) -> None:
    with caplog.at_level(logging.DEBUG), pytest.raises(LedgerError) as err:
        Ledger.open(url, tmp_path)
    assert "127.0.0.1" in str(err.value) and SECRET not in str(err.value)
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def collector_toml(tmp: Path, ledger: str = "sqlite", extra: str = "") -> Path:
    path = tmp / "collector.toml"
    path.write_text(f'[collector]\ndata_dir = "{tmp / "data"}"\nledger = "{ledger}"\n{extra}')
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABMETER, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("url", closed_port_ledgers(), ids=["userinfo", "query", "sslpassword"])
def test_ledger_password_in_no_output_of_a_real_process(url: str, tmp_path: Path) -> None:
    cfg = collector_toml(tmp_path, url)
    (tmp_path / "instruments.csv").write_text("code\nCZ-A\n")
    for args in (
        ("collector", "run", "-v", "-c", str(cfg)),
        ("report", "hours", "--from", "2026-03-01", "--to", "2026-03-31", "-c", str(cfg)),
        ("collector", "import-instruments", str(tmp_path / "instruments.csv"), "-c", str(cfg)),
    ):
        out = run(*args, cwd=tmp_path)
        text = out.stdout + out.stderr
        assert out.returncode == 2, (args, text)
        assert "error: ledger postgresql://labmeter" in out.stderr and "127.0.0.1" in out.stderr, text
        assert SECRET not in text and "Traceback" not in text, text


def test_broker_url_with_a_password_is_refused_without_showing_it(tmp_path: Path) -> None:
    cfg = collector_toml(tmp_path, extra=f'[broker]\nurl = "mqtt://lab:{SECRET}@127.0.0.1:1883"\n')
    out = run("collector", "run", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "broker.url" in out.stderr and "mqtt://lab:***@127.0.0.1" in out.stderr
    assert SECRET not in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_no_secret_in_the_logs_of_a_running_collector(tmp_path: Path) -> None:
    """A collector whose broker and time-series store are both unreachable, with a broker password, an
    InfluxDB URL carrying credentials, an InfluxDB token and a web token: it logs its failing connections
    (debug level) and none of the four secrets."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    values = {
        "broker.pass": "broker-pass-" + SECRET,
        "influx.token": "influx-token-" + SECRET,
        "web.token": "web-token-" + SECRET,
    }
    for name, value in values.items():
        (secrets / name).write_text(value + "\n")
    broker_port, influx_port, web_port = free_port(), free_port(), free_port()
    cfg = collector_toml(
        tmp_path,
        extra=(
            f'[broker]\nurl = "mqtt://127.0.0.1:{broker_port}"\nusername = "collector"\n'
            f'password_file = "{secrets / "broker.pass"}"\n'
            f'[influxdb]\nurl = "http://127.0.0.1:{influx_port}/?org=lab&token={SECRET}"\n'
            f'token_file = "{secrets / "influx.token"}"\nevery_s = 0.2\n'
            f'[web]\nlisten = "127.0.0.1:{web_port}"\ntoken_file = "{secrets / "web.token"}"\n'
        ),
    )
    parsed = config.load(cfg, config.CollectorConfig)
    ledger = Ledger.open(parsed.collector.ledger, parsed.collector.data_dir)
    now = int(time.time() * 1000)
    store_schedule(tmp_path, ledger, "a1", "CZ-A", [(now - 7_200_000, now - 3_600_000, "RUNNING")])
    ledger.close()
    errlog = tmp_path / "collector.err"
    needed = ("cannot reach broker", "time-series store http://127.0.0.1", "token=***", "Connect")
    with errlog.open("wb") as err_file:
        proc = subprocess.Popen(
            [*LABMETER, "collector", "run", "-v", "-c", str(cfg)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
        )
        try:
            # the sink's first writes wait for rows to settle (2 s), then fail: wait for both failures logged
            wait_for(
                lambda: all(w in errlog.read_text(errors="replace") for w in needed),
                60,
                what="the broker and the sink failures logged",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
    err = errlog.read_text(errors="replace")
    text = out + err
    assert "cannot reach broker" in err and "time-series store http://127.0.0.1" in err, err
    assert "token=***" in err and "Connect" in err, err
    assert SECRET not in text, [line for line in text.splitlines() if SECRET in line]


@pytest.mark.parametrize("credentials", ["userinfo", "query"])
def test_sink_failure_is_logged_without_credentials(credentials: str, tmp_path: Path, caplog: Any) -> None:
    """In process, so the redaction at the source is checked, not only the log formatter's net."""
    from labmeter.collector.sink_influx import InfluxSink

    ledger = Ledger(tmp_path / "ledger.sqlite")
    now = int(time.time() * 1000)
    store_schedule(tmp_path, ledger, "a1", "CZ-A", [(now - 7_200_000, now - 3_600_000, "RUNNING")])
    token = tmp_path / "token"
    token.write_text("tok-" + SECRET)
    url = (
        f"http://admin:{SECRET}@127.0.0.1:{free_port()}/"
        if credentials == "userinfo"
        else f"http://127.0.0.1:{free_port()}/?token={SECRET}"
    )
    cfg = config.InfluxConfig(url=url, token_file=token, every_s=0.1)

    async def main() -> None:
        sink = InfluxSink(cfg, ledger, config.PolicyConfig(), settle_ms=0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2):
                await sink.run()
        await sink.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "labmeter.sink"]
    assert lines and all(redact_url(url) in m for m in lines), lines
    assert not any(SECRET in r.getMessage() for r in caplog.records)
    ledger.close()


def test_log_formatter_masks_urls_and_hidden_tokens_even_in_tracebacks() -> None:
    log.hide("tok-" + SECRET + "-hidden")
    fmt = log.RedactingFormatter("%(message)s")
    try:
        raise RuntimeError(f"failed on postgresql://u:{SECRET}@h/db with tok-{SECRET}-hidden")
    except RuntimeError:
        import sys

        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "url %s", (f"http://h/?password={SECRET}",), sys.exc_info()
        )
    text = fmt.format(record)
    assert "RuntimeError" in text and "password=***" in text and "u:***@h" in text
    assert SECRET not in text


@pytest.mark.parametrize("problem", ["empty", "blank lines", "a directory", "missing"])
@pytest.mark.parametrize("which", ["web", "influxdb"])
def test_bad_token_file_stops_start_up_naming_it(problem: str, which: str, tmp_path: Path) -> None:
    token = tmp_path / "token"
    if problem == "empty":
        token.write_text("")
    elif problem == "blank lines":
        token.write_text("\n  \n")
    elif problem == "a directory":
        token.mkdir()
    section = (
        f'[web]\nlisten = "127.0.0.1:{free_port()}"\ntoken_file = "{token}"\n'
        if which == "web"
        else f'[influxdb]\nurl = "http://127.0.0.1:{free_port()}"\ntoken_file = "{token}"\n'
    )
    cfg = collector_toml(
        tmp_path, extra=f'[broker]\nembedded = true\nlisten = "127.0.0.1:{free_port()}"\n' + section
    )
    out = run("collector", "run", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"error: {token}: " in out.stderr and "token file" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
