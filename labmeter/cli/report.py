"""`labmeter report ...`: hours, national export, findings, reconciliation and evidence bundles from the ledger."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from labmeter import log, signing
from labmeter.cli.common import (
    choose_format,
    config_option,
    fail,
    load_collector,
    need_collector_deps,
    open_ledger,
    output_options,
    period_options,
    tz_option,
    zone_for,
)


@click.group("report")
def report_group() -> None:
    """Reports from the ledger."""
    need_collector_deps()
    log.setup()  # progress, such as rebuilding rollups after allowances changed, goes to stderr


HOURS_FORMATS = ("table", "csv", "json", "xlsx")


def lang_options(f: Any) -> Any:
    """``--lang`` (column names) and ``--no-bom``: what every tabular report takes."""
    f = click.option(
        "--no-bom", is_flag=True, help="CSV without the UTF-8 BOM (Excel needs it to read UTF-8)."
    )(f)
    return click.option(
        "--lang",
        type=click.Choice(["zh", "en"]),
        default="zh",
        show_default=True,
        help="Language of the column names.",
    )(f)


@report_group.command("hours")
@period_options()
@config_option("collector.toml")
@click.option(
    "--by",
    type=click.Choice(["instrument", "unit", "category", "month"]),
    default="instrument",
    show_default=True,
    help="Grouping (XLSX has a sheet for each).",
)
@output_options(HOURS_FORMATS)
@lang_options
def report_hours(
    start: str,
    end: str,
    cfg_path: Path,
    by: str,
    fmt: str | None,
    out: Path | None,
    lang: str,
    no_bom: bool,
    tz: str | None,
) -> None:
    """Run, effective, service and external hours, utilisation, sharing rate and coverage.

    XLSX has an About (说明) sheet and JSON a "meta" object: period, time zone, allowances, rated-hours
    basis, generation time, version, ledger, caveats and every column's definition. JSON and CSV carry
    exact seconds beside the hours. Each instrument counts from when its metering began up to now.
    """
    from labmeter.collector.reports.hours import (
        GROUPINGS,
        PeriodError,
        hours_report,
        hours_reports,
        parse_time,
        render,
        report_meta,
        write_xlsx,
    )

    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    fmt = choose_format(fmt, out, HOURS_FORMATS, "report hours")
    ledger = open_ledger(cfg, cfg_path)
    try:
        a, b = parse_time(start, zone), parse_time(end, zone, end=True)
        if fmt == "xlsx":
            assert out is not None
            meta = report_meta(ledger, a, b, cfg.policy, zone, GROUPINGS)
            sheets = hours_reports(ledger, a, b, cfg.policy, GROUPINGS, zone, meta["generated_ms"])
            write_xlsx(out, sheets, lang, meta, zone)
            click.echo(f"written {out}")
            return
        meta = report_meta(ledger, a, b, cfg.policy, zone, [by])
        rows = hours_report(ledger, a, b, cfg.policy, by, zone, now_ms=meta["generated_ms"])
        text = render(rows, fmt, lang, by, meta, bom=not no_bom, tz=zone)
    except PeriodError as exc:
        fail(str(exc))
    finally:
        ledger.close()
    if out is not None:
        out.write_text(text, encoding="utf-8")
        click.echo(f"written {out}")
    else:
        sys.stdout.write(text)


@report_group.command("national")
@click.option("--year", type=int, required=True, help="Calendar year (local time).")
@click.option(
    "--output", "-o", "out", required=True, type=click.Path(path_type=Path), help="FILE.json or FILE.xlsx"
)
@click.option("--ins-code", default="", help="The unit's code at the national platform (insCode).")
@config_option("collector.toml")
@tz_option()
def report_national(year: int, out: Path, ins_code: str, cfg_path: Path, tz: str | None) -> None:
    """National sharing-platform export: instrument records (runMachine, serviceMachine) and service records.

    The platform's field names and codes (docs/national.md); exact times and seconds beside them under
    "labmeter". The format follows the extension (.json or .xlsx; anything else is refused). Warns
    when the year is not over or has little or no coverage.
    """
    from labmeter.collector.reports.national import ExportError, format_for, national_export, write_national

    try:
        format_for(out)
    except ExportError as exc:
        fail(str(exc))
    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    try:
        data = national_export(ledger, year, cfg.policy, zone_for(tz, cfg), ins_code)
    finally:
        ledger.close()
    write_national(data, out)
    for warning in data["warnings"]:
        click.echo(f"warning: {log.printable(warning)}", err=True)  # codes from the registry: no escapes
    click.echo(
        f"{len(data['instruments']['instruList'])} instrument(s), "
        f"{len(data['serviceRecords']['instruList'])} service record(s) -> {out}"
    )


@report_group.command("findings")
@period_options()
@config_option("collector.toml")
@click.option(
    "--low-use",
    "low_use",
    type=float,
    default=50,
    show_default=True,
    help="List instruments under this share (%) of their rated hours.",
)
@click.option(
    "--min-coverage",
    type=float,
    default=90,
    show_default=True,
    help="List instruments whose state is known for less than this share (%) of the period.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report_findings(
    start: str, end: str, cfg_path: Path, low_use: float, min_coverage: float, as_json: bool, tz: str | None
) -> None:
    """Instruments to act on: low use, poor coverage (agents down, unknown time), no data at all."""
    from labmeter.collector.reports.hours import PeriodError, parse_time
    from labmeter.collector.reports.national import findings

    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    ledger = open_ledger(cfg, cfg_path)
    try:
        res = findings(
            ledger,
            parse_time(start, zone),
            parse_time(end, zone, end=True),
            cfg.policy,
            low_use,
            min_coverage,
        )
    except PeriodError as exc:
        fail(str(exc))
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps(res, ensure_ascii=False, indent=2))
        return
    titles = {
        "low_use": f"Low use (< {low_use:g}% of rated hours) 低使用率",
        "poor_coverage": f"Poor coverage (< {min_coverage:g}% known) 数据覆盖不足",
        "no_data": "No data 无数据",
    }
    for key, title in titles.items():
        click.echo(f"{title}: {len(res[key])}")
        for item in res[key]:
            extra = ", ".join(f"{k} {v}" for k, v in item.items() if k not in ("instrument", "name", "unit"))
            click.echo(f"  {item['instrument']}  {item['name']}  {item['unit']}  {extra}")


RECONCILE_FORMATS = ("table", "csv", "json", "xlsx")


@report_group.command("reconcile")
@period_options("days")
@config_option("collector.toml")
@click.option("--instrument", help="One instrument only (code).")
@click.option(
    "--part",
    type=click.Choice(["all", "records", "findings", "summary"]),
    default="all",
    show_default=True,
    help="Which table (CSV holds one; XLSX always has all).",
)
@output_options(RECONCILE_FORMATS)
@lang_options
def report_reconcile(
    start: str,
    end: str,
    cfg_path: Path,
    instrument: str | None,
    part: str,
    fmt: str | None,
    out: Path | None,
    lang: str,
    no_bom: bool,
    tz: str | None,
) -> None:
    """Each booking against the meter: run and effective time inside it, and the findings.

    Findings (thresholds in [policy], docs/reconcile.md): booked but not used, running with no booking and
    no sign-in (per day), sign-in without running, long powered idle (空载), overlapping bookings, bookings
    outside metered time. A per-instrument summary: booked hours, used share, unattributed run, idle.
    """
    from labmeter.collector.reports.formats import FormatError
    from labmeter.collector.reports.hours import PeriodError, parse_time
    from labmeter.collector.reports.reconcile import reconcile, render, write_xlsx

    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    fmt = choose_format(fmt, out, RECONCILE_FORMATS, "report reconcile")
    ledger = open_ledger(cfg, cfg_path)
    try:
        a, b = parse_time(start, zone), parse_time(end, zone, end=True)
        rec = reconcile(ledger, a, b, cfg.policy, zone, instrument)
        if fmt == "xlsx":
            assert out is not None
            write_xlsx(out, rec, lang, zone)
            click.echo(f"written {out}")
            return
        text = render(rec, fmt, lang, zone, part, bom=not no_bom)
    except (PeriodError, FormatError) as exc:
        fail(str(exc))
    finally:
        ledger.close()
    if out is not None:
        out.write_text(text, encoding="utf-8")
        click.echo(f"written {out}")
    else:
        sys.stdout.write(text)


@report_group.command("evidence")
@click.option("--instrument", required=True, help="Instrument code.")
@period_options("dates")
@click.option(
    "--output", "-o", "out", required=True, type=click.Path(path_type=Path), help="Folder to write."
)
@config_option("collector.toml")
def report_evidence(instrument: str, start: str, end: str, out: Path, cfg_path: Path, tz: str | None) -> None:
    """Write the signed intervals and public keys behind an instrument's hours, countersigned, for `labmeter verify`."""
    from labmeter.collector.identity import collector_key
    from labmeter.collector.ledger.rollup import allowances_ms
    from labmeter.collector.reports.evidence import write_bundle
    from labmeter.collector.reports.hours import PeriodError, parse_time

    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    try:
        key = collector_key(cfg.collector)
    except signing.KeyFileError as exc:
        fail(str(exc))
    ledger = open_ledger(cfg, cfg_path)
    try:
        a, b = parse_time(start, zone), parse_time(end, zone, end=True)
        info = next((i for i in ledger.instruments() if i["code"] == instrument), {})
        prep_ms, post_ms = allowances_ms(info, cfg.policy)
        bundle = write_bundle(ledger, instrument, a, b, prep_ms // 1000, post_ms // 1000, out, key)
    except PeriodError as exc:
        fail(str(exc))
    finally:
        ledger.close()
    if not bundle["intervals"]:
        fail(f"no intervals for instrument {instrument!r} in that period", code=1)
    click.echo(
        f"{bundle['intervals']} signed interval(s) and {bundle['services']} service record(s) written to "
        f"{out}, countersigned by collector key "
        f"{signing.key_id(key.public_key())}; check with: labmeter verify {out} --trust KEYS.json"
    )
