"""`labmeter collector ...` and `labmeter broker`: run the collector, manage its registry, keys and broker accounts."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import click

from labmeter import config, log, signing
from labmeter.cli.common import (
    config_option,
    fail,
    load_agent,
    load_collector,
    move_aside,
    need_collector_deps,
    open_ledger,
    reset_precheck,
    run_until_signal,
    tz_option,
    verbose_option,
    zone_for,
)
from labmeter.statefile import StateFileError


@click.group("collector")
def collector_group() -> None:
    """Run the collector and manage its registry."""
    need_collector_deps()


@collector_group.command("run")
@config_option("collector.toml")
@verbose_option
def collector_run(cfg_path: Path, verbose: bool) -> None:
    """Receive, verify and store intervals (starts the built-in broker if [broker] embedded = true)."""
    from labmeter.clock import clock_from_env
    from labmeter.collector.ledger import LedgerError
    from labmeter.collector.service import Collector

    log.setup(verbose)
    cfg = load_collector(cfg_path)

    async def main(stop: asyncio.Event) -> None:
        from labmeter.collector.ledger import LedgerError

        try:
            collector = Collector(cfg, clock_from_env())
        except StateFileError as exc:
            fail(exc.message(cfg_path))
        except LedgerError as exc:
            fail(str(exc))
        try:
            await collector.run(stop)
        except signing.KeyFileError as exc:
            fail(f"[collector] key_file: {exc}")

    try:
        config.check_secret_files(cfg)
        run_until_signal(main)
    except (config.ConfigError, LedgerError) as exc:
        fail(str(exc))


@collector_group.command("check")
@config_option("collector.toml")
@click.option("--quick", is_flag=True, help="SQLite: PRAGMA quick_check (O(N)) instead of integrity_check.")
def collector_check(cfg_path: Path, quick: bool) -> None:
    """Check the config, the ledger (SQLite: PRAGMA integrity_check; PostgreSQL: connection and schema)
    and the collector's key; exit status 1 if anything is wrong.

    On PostgreSQL the pages themselves are not read: that is the server's job (initdb --data-checksums,
    pg_amcheck).
    """
    import time

    from labmeter.collector.ledger import Ledger, LedgerError

    cfg = load_collector(cfg_path)
    click.echo(f"config  {cfg_path}: OK")
    ok = True
    url = cfg.collector.ledger
    path = Ledger.sqlite_path(url, cfg.collector.data_dir)
    name = str(path) if path else url.split("@")[-1]
    if path is not None and not path.exists():
        click.echo(f"ledger  {path}: not created yet (the first `collector run` or `add-agent` creates it)")
    else:
        try:
            t0 = time.monotonic()
            ledger = Ledger.open(url, cfg.collector.data_dir)
            try:
                problems = ledger.check(full=not quick)
                counts = ledger.counts()
                settings = ledger.server_settings()
            finally:
                ledger.close()
            how = ("quick_check" if quick else "integrity_check") if path else "connection and schema"
            took = time.monotonic() - t0
        except StateFileError as exc:
            problems, how, settings = [exc.problem], "", {}
        except LedgerError as exc:
            problems, how, settings = [str(exc)], "", {}
        except Exception as exc:  # damage that the check itself trips over
            problems, how, settings = [f"damaged: {exc}"], "", {}
        if problems:
            ok = False
            label = "DAMAGED" if path is not None else "PROBLEM"
            click.echo(f"ledger  {name}: {label} {'(' + how + ') ' if how else ''}{'; '.join(problems)}")
            if path is not None:
                click.echo(
                    f"  restore it from a backup, or: labmeter collector reset-ledger --config {cfg_path}"
                )
        else:
            click.echo(
                f"ledger  {name}: OK ({how}, {took:.1f} s; {counts['agents']} agent(s), "
                f"{counts['instruments']} instrument(s), {counts['intervals']} interval(s), "
                f"{counts['rejections']} rejection(s))"
            )
        if path is None and settings:
            click.echo(
                f"  PostgreSQL {settings['server_version']}: fsync {settings['fsync']}, synchronous_commit "
                f"{settings['synchronous_commit']}, data_checksums {settings['data_checksums']}; not checked "
                "here: the server's pages (initdb --data-checksums, pg_amcheck)"
            )
    key_path = cfg.collector.key_path
    if not key_path.exists():
        click.echo(f"key     {key_path}: not created yet (the first `collector run` creates it)")
    else:
        try:
            key = signing.load_private_key(key_path)
            click.echo(f"key     {key_path}: OK (agents pin {signing.public_key_text(key.public_key())})")
        except signing.KeyFileError as exc:
            ok = False
            click.echo(f"key     {exc}")
    sys.exit(0 if ok else 1)


@collector_group.command("alert-test")
@config_option("collector.toml")
def collector_alert_test(cfg_path: Path) -> None:
    """Send one test message to each channel of [alerts] and say, per channel, whether it arrived.

    Exit status 1 if any channel failed (docs/alerts.md says how to set up WeCom and DingTalk robots).
    """
    from zoneinfo import ZoneInfo

    from labmeter.collector.alerts import send_test

    log.setup(quiet=True)
    cfg = load_collector(cfg_path)
    if cfg.alerts is None:
        fail(f"{cfg_path}: no [alerts] section; docs/alerts.md shows one")
    try:
        results = asyncio.run(send_test(cfg.alerts, ZoneInfo(cfg.policy.timezone)))
    except config.ConfigError as exc:
        fail(str(exc))
    for name, kind, error in results:
        click.echo(f"{name:<20} {kind:<9} {'sent' if error is None else 'FAILED: ' + error}")
    sys.exit(1 if any(error is not None for _, _, error in results) else 0)


@collector_group.command("reset-ledger")
@config_option("collector.toml")
@click.option("--force", is_flag=True, help="Also when the ledger is sound: everything in it is set aside.")
def collector_reset_ledger(cfg_path: Path, force: bool) -> None:
    """Move a damaged SQLite ledger aside, so that the next start begins an empty one.

    Stop the collector first. The old file stays beside the new one, renamed ledger.sqlite.damaged-<UTC time>.
    """
    from labmeter.collector.ledger import Ledger

    cfg = load_collector(cfg_path)
    path = Ledger.sqlite_path(cfg.collector.ledger, cfg.collector.data_dir)
    if path is None:
        fail(
            "the ledger is on PostgreSQL, not in a file: restore it with pg_restore, or drop and "
            "create the database yourself (docs/deploy.md)",
            code=1,
        )
    problem = reset_precheck(
        path, force, lambda: Ledger(path), lambda s: s.counts()["intervals"], "interval(s)"
    )
    target = move_aside(path)
    click.echo(f"moved {path} to {target} ({problem})")
    click.echo(
        "the next start creates an empty ledger: register the agents again (`labmeter collector add-agent`) "
        "and import the instruments; agents then resend what they still hold unacknowledged"
    )


@collector_group.command("add-agent")
@click.argument("agent_id")
@click.option("--key", required=True, help="Public key printed by `labmeter agent enroll` (ed25519:...).")
@click.option(
    "--instrument",
    "instruments",
    multiple=True,
    required=True,
    help="Instrument code this agent measures (repeat).",
)
@config_option("collector.toml")
@click.option(
    "--mosquitto-dir",
    type=click.Path(path_type=Path),
    help="Also create the agent's broker account here (passwd, acl, secrets/ID.pass).",
)
@click.option(
    "--agent-config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The agent's agent.toml: its account may read exactly the plug topics its instruments use.",
)
def collector_add_agent(
    agent_id: str,
    key: str,
    instruments: tuple[str, ...],
    cfg_path: Path,
    mosquitto_dir: Path | None,
    agent_config: Path | None,
) -> None:
    """Register an agent's public key and the instruments it may report."""
    from labmeter.wire import ID_RE

    cfg = load_collector(cfg_path)
    for name in [agent_id, *instruments]:
        if not ID_RE.match(name):
            fail(f"{name!r}: ids use letters, digits, '.', '_' and '-' only (at most 64)")
    if agent_config is not None and mosquitto_dir is None:
        fail("--agent-config needs --mosquitto-dir (it sets what the broker account may read)")
    block = _agent_block(agent_id, agent_config) if mosquitto_dir is not None else ""
    if agent_config is not None:
        missing = [i.id for i in load_agent(agent_config).instrument if i.id not in instruments]
        if missing:
            click.echo(
                f"note: {agent_config} also has {', '.join(missing)}, not registered here (no --instrument): "
                "the collector will reject their intervals",
                err=True,
            )
    try:
        pub = signing.parse_public_key(key)
    except signing.KeyFileError as exc:
        fail(str(exc))
    ledger = open_ledger(cfg, cfg_path)
    ledger.add_agent(agent_id, key, signing.key_id(pub), instruments)
    ledger.close()
    click.echo(
        f"agent {agent_id} registered for {', '.join(instruments)} (key fingerprint {signing.key_id(pub)}); "
        "publish the key list again: labmeter collector export-keys -o keys.json"
    )
    own = _collector_public_key(cfg)
    click.echo(f"pin this collector's key in the agent's agent.toml, under [agent] (fingerprint {own[1]}):")
    click.echo(f'  collector_key = "{own[0]}"')
    click.echo(f"  or: labmeter agent enroll --collector-key {own[0]}")
    if mosquitto_dir is not None:
        _broker_account(mosquitto_dir, agent_id, "agent", block)


def _collector_public_key(cfg: config.CollectorConfig) -> tuple[str, str]:
    """The collector's public key text and fingerprint (its key is created on first use)."""
    from labmeter.collector.identity import collector_key

    try:
        pub = collector_key(cfg.collector).public_key()
    except signing.KeyFileError as exc:
        fail(f"[collector] key_file: {exc}")
    return signing.public_key_text(pub), signing.key_id(pub)


@collector_group.command("key")
@config_option("collector.toml")
def collector_key_cmd(cfg_path: Path) -> None:
    """Show the collector's public key and fingerprint (agents pin it; it signs their acknowledgements)."""
    cfg = load_collector(cfg_path)
    text, fingerprint = _collector_public_key(cfg)
    click.echo(f"collector key file: {cfg.collector.key_path}")
    click.echo(f"fingerprint: {fingerprint}")
    click.echo(f"public key: {text}")
    click.echo("pin it in each agent.toml, under [agent]:")
    click.echo(f'  collector_key = "{text}"')


def _agent_block(agent_id: str, agent_config: Path | None) -> str:
    """The agent's ACL: its own labmeter topics, plus the plug topics its config reads (none without one)."""
    from labmeter.collector.mosquitto import AccountError, agent_acl, agent_plug_topics

    if agent_config is None:
        click.echo(
            f"note: no --agent-config: {agent_id} may read no plug topics; give its agent.toml if it reads "
            "MQTT plugs on this broker",
            err=True,
        )
        return agent_acl(agent_id)
    acfg = load_agent(agent_config)
    if acfg.agent.id != agent_id:
        fail(f"{agent_config}: [agent] id is {acfg.agent.id!r}, not {agent_id!r}")
    try:
        plugs = agent_plug_topics(acfg)
    except AccountError as exc:
        fail(f"{agent_config}: {exc}")
    for inst in plugs.elsewhere:
        click.echo(
            f"note: instrument {inst} reads its plug from its own [instrument.source.broker]; "
            "make its account on that broker",
            err=True,
        )
    return agent_acl(agent_id, plugs.topics)


new_password_option = click.option(
    "--new-password",
    is_flag=True,
    help="Give an existing account a new password (it keeps its own otherwise).",
)


def _broker_account(directory: Path, user: str, role: str, block: str, new_password: bool = False) -> None:
    from labmeter.collector.mosquitto import AccountError, add_account

    try:
        account = add_account(directory, user, block, new_password)
    except AccountError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{directory}: {exc.strerror or exc}")
    if account.new_password:
        click.echo(
            f"broker account {user}: password in {account.secret} (mode 0600; copy it to the {role}'s "
            + ("device settings)" if role == "plug" else "password_file)")
        )
    else:
        click.echo(
            f"broker account {user}: exists, password kept (--new-password to change it); ACL rewritten"
        )
    if account.owner is not None:
        click.echo(
            f"{directory / 'passwd'} and {directory / 'acl'}: {account.owner.name}:{account.owner.name} 0600"
        )
    else:
        click.echo(
            f"warning: not root or no 'mosquitto' user here: {directory}/passwd and acl are yours, mode 0600; "
            f"Mosquitto 2 reads them as its own user: chown mosquitto:mosquitto {directory}/passwd {directory}/acl",
            err=True,
        )
    for warning in account.warnings:
        click.echo(f"warning: {warning}; Mosquitto could not read its files", err=True)
    click.echo(f"ACL lines in {directory / 'acl'}:")
    click.echo("".join(f"  {line}\n" for line in account.block.splitlines()).rstrip())
    click.echo("reload Mosquitto to apply: systemctl reload mosquitto (or kill -HUP)")


mosquitto_dir_option = click.option(
    "--mosquitto-dir", required=True, type=click.Path(path_type=Path), help="Where passwd and acl live."
)


@collector_group.command("broker-user")
@click.argument("user")
@mosquitto_dir_option
@click.option("--role", type=click.Choice(["collector", "agent"]), default="collector", show_default=True)
@click.option(
    "--agent-config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="--role agent: the agent's agent.toml, for the plug topics its account may read.",
)
@new_password_option
def collector_broker_user(
    user: str, mosquitto_dir: Path, role: str, agent_config: Path | None, new_password: bool
) -> None:
    """Create a Mosquitto account (the collector's own, usually): password line, ACL block, secret file.

    Run it again for an agent to follow a changed agent.toml (the password is kept; --new-password
    changes it)."""
    from labmeter.collector.mosquitto import collector_acl

    if role == "collector":
        if agent_config is not None:
            fail("--agent-config is for --role agent")
        block = collector_acl(user)
    else:
        block = _agent_block(user, agent_config)
    _broker_account(mosquitto_dir, user, role, block, new_password)


@collector_group.command("plug-user")
@click.argument("user")
@mosquitto_dir_option
@click.option(
    "--agent-config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The agent.toml that reads this plug; with --instrument, its format and topic are taken from there.",
)
@click.option("--instrument", "instruments", multiple=True, help="The instrument this plug meters (repeat).")
@click.option(
    "--format", "fmt", help="tasmota, shelly-gen1, shelly-gen2, zigbee2mqtt, esphome or json (the driver's)."
)
@click.option("--topic", help="With --format: the topic the instrument reads, e.g. tele/plug-07/SENSOR.")
@click.option("--availability-topic", help="With --format json: the device's online/offline topic.")
@new_password_option
def collector_plug_user(
    user: str,
    mosquitto_dir: Path,
    agent_config: Path | None,
    instruments: tuple[str, ...],
    fmt: str | None,
    topic: str | None,
    availability_topic: str | None,
    new_password: bool,
) -> None:
    """Create a smart plug's (or a Zigbee2MQTT bridge's) Mosquitto account: it may write only its own topics.

    Give --agent-config and --instrument (the plug's format and topic as the agent reads them), or
    --format and --topic."""
    from labmeter.collector.mosquitto import AccountError, Plug, agent_plugs, plug_acl

    try:
        if agent_config is not None:
            if not instruments or fmt or topic:
                fail("--agent-config goes with --instrument (and without --format/--topic)")
            plugs = agent_plugs(load_agent(agent_config), instruments)
        elif fmt and topic:
            if instruments:
                fail("--instrument needs --agent-config")
            plugs = [Plug(fmt, topic, availability_topic)]
        else:
            fail("give --agent-config agent.toml --instrument ID, or --format FORMAT --topic TOPIC")
        block = plug_acl(user, plugs)
    except AccountError as exc:
        fail(f"{agent_config}: {exc}" if agent_config else str(exc))
    _broker_account(mosquitto_dir, user, "plug", block, new_password)


@collector_group.command("export-keys")
@config_option("collector.toml")
@click.option(
    "--output",
    "-o",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File to write (default: stdout).",
)
def collector_export_keys(cfg_path: Path, out: Path | None) -> None:
    """Write the agents' and the collector's public keys and fingerprints, to publish for `verify --trust`."""
    import time

    from labmeter.collector.identity import collector_key
    from labmeter.collector.reports.evidence import export_keys

    cfg = load_collector(cfg_path)
    try:
        pub = collector_key(cfg.collector).public_key()
    except signing.KeyFileError as exc:
        fail(str(exc))
    ledger = open_ledger(cfg, cfg_path)
    try:
        doc = export_keys(ledger, pub, int(time.time() * 1000))
    finally:
        ledger.close()
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"{out}: cannot write ({exc.strerror or exc})")
    click.echo(
        f"{len(doc['agents'])} agent key(s) and the collector key {doc['collector']['fingerprint']} written to {out}; "
        "publish it where evaluators can fetch it apart from any bundle",
        err=True,
    )


@collector_group.command("import-instruments")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@config_option("collector.toml")
def collector_import(file: Path, cfg_path: Path) -> None:
    """Add or update instruments from a CSV or XLSX sheet (all rows or none).

    Columns (English or Chinese headers, synonyms such as 设备编号 accepted; title rows above the header
    are skipped): code 仪器编号, name 仪器名称, unit 管理单位, department 所在部门, category 分类编码
    (6 digits; a leading zero Excel dropped is restored), kind 仪器类型 (general 通用 / special 专用),
    value_wan 原值（万元）, rated_hours 定额机时, share_mode 共享模式, metering_start 计量开始日期 (a local date
    or time in the policy's zone; time before it is "not metered" in reports; without it metering starts
    at the instrument's first interval). CSV may be UTF-8 (with or without
    BOM) or GBK/GB18030. Numbers must be finite and not negative (rated_hours at most 8784, allowances at
    most a day); every bad cell is named by row and column.
    """
    from labmeter.collector.registry import ImportError_, import_instruments

    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    notes: list[str] = []
    try:
        n = import_instruments(ledger, file, notes, ZoneInfo(cfg.policy.timezone))
    except ImportError_ as exc:
        fail(str(exc))
    finally:
        ledger.close()
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{n} instrument(s) imported")


@collector_group.command("import-services")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--instrument", help="Instrument the file is about (for a per-instrument sheet or calendar).")
@click.option(
    "--replace",
    is_flag=True,
    help="First remove each instrument's stored records that start within the file's span for it.",
)
@config_option("collector.toml")
@tz_option("times without one")
def collector_import_services(
    file: Path, instrument: str | None, replace: bool, cfg_path: Path, tz: str | None
) -> None:
    """Import service records (bookings, usage logs) from CSV, XLSX or iCalendar as one batch (all rows or none).

    Columns: instrument 仪器编号, start 开始时间, end 结束时间, applicant 申请人, applicant_unit 申请单位,
    service_type 服务类型 (120 internal 对内 / 130 external 对外), direction 服务方向 (135-138), amount 金额.
    Times: 2026-03-02 08:30, Excel's 2026/3/2 8:30, 2026年3月2日 8:30 or date-time cells. A record identical
    to one already imported (instrument, start, end, applicant) is skipped; to correct records, import
    the corrected file with --replace, or remove a batch with `collector services delete BATCH`.
    """
    from labmeter.collector.registry import ImportError_, import_services

    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    try:
        res = import_services(ledger, file, zone_for(tz, cfg), instrument, replace=replace)
    except ImportError_ as exc:
        fail(str(exc))
    finally:
        ledger.close()
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    msg = f"batch {res.batch}: {res.added} service record(s) imported, {res.duplicates} already present"
    if replace:
        msg += f", {res.replaced} replaced"
    click.echo(msg)
    if res.differ:
        click.echo(
            f"warning: {res.differ} of the records already present differ from the stored ones (unit, type, "
            "direction or amount); the stored ones were kept. Import with --replace to correct them.",
            err=True,
        )


@collector_group.group("services")
def services_group() -> None:
    """Service-record import batches: list them, delete one."""


@services_group.command("list")
@config_option("collector.toml")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@tz_option("the times shown")
def services_list(cfg_path: Path, as_json: bool, tz: str | None) -> None:
    """Every import batch: id, file, when imported, records it holds, instruments and time span."""
    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    ledger = open_ledger(cfg, cfg_path)
    try:
        batches = ledger.service_batches()
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps(batches, ensure_ascii=False, indent=2))
        return
    if not batches:
        click.echo("no service records imported")

    def when(ms: object) -> str:
        if not isinstance(ms, int):
            return "-"
        return datetime.fromtimestamp(ms / 1000, zone).strftime("%Y-%m-%d %H:%M")

    for b in batches:
        bid = "-" if b["batch"] is None else str(b["batch"])
        codes = b["instruments"] if isinstance(b["instruments"], list) else []
        click.echo(
            f"{bid:>5}  {when(b['imported_ms'])}  {b['records']:>6} record(s)  {when(b['from_ms'])} .. "
            f"{when(b['to_ms'])}  {','.join(map(str, codes)) or '-'}  {log.printable(str(b['source']))}"
        )


@services_group.command("delete")
@click.argument("batch", type=int)
@config_option("collector.toml")
def services_delete(batch: int, cfg_path: Path) -> None:
    """Remove one import batch and all of its service records (reports recompute the hours)."""
    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    try:
        n = ledger.delete_service_batch(batch)
    finally:
        ledger.close()
    if n is None:
        fail(f"no batch {batch} (see `labmeter collector services list`)", code=1)
    click.echo(f"batch {batch} deleted: {n} service record(s) removed")


@collector_group.command("rejections")
@click.option("--hours", type=click.IntRange(min=1), default=24, show_default=True, help="How far back.")
@config_option("collector.toml")
def collector_rejections(hours: int, cfg_path: Path) -> None:
    """Rejected messages: authentic ones (the sender's own, kept whole) and the unauthenticated ones'
    hourly counts, most frequent first."""
    import time

    from labmeter.collector.ledger import Ledger

    cfg = load_collector(cfg_path)
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    try:
        rows = ledger.rejection_summary(int(time.time() * 1000) - hours * 3_600_000)
    finally:
        ledger.close()
    if not rows:
        click.echo(f"no rejections in the last {hours} h")
    for reason, topic, n, authentic in rows:
        click.echo(f"{n:>8}  {'kept   ' if authentic else 'counted'}  {topic}  {reason}")


@click.command("broker")
@click.option("--listen", default="127.0.0.1:1883", show_default=True, help="host:port to listen on.")
@verbose_option
def broker(listen: str, verbose: bool) -> None:
    """Run the built-in MQTT broker on its own (the collector starts it itself when embedded = true)."""
    need_collector_deps()
    from labmeter.collector.broker import EmbeddedBroker
    from labmeter.netutil import split_listen

    try:
        split_listen(listen)
    except ValueError as exc:
        fail(f"--listen: {exc}")
    log.setup(verbose)

    async def main(stop: asyncio.Event) -> None:
        b = EmbeddedBroker(listen)
        await b.start()
        await stop.wait()
        await b.stop()

    run_until_signal(main)
