"""`labmeter agent ...`: enrol, run, probe, calibrate, install and inspect the agent beside the instruments."""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import datetime
from pathlib import Path

import click

from labmeter import config, log, signing, winsys
from labmeter.cli.common import (
    config_option,
    fail,
    load_agent,
    move_aside,
    open_store,
    reset_precheck,
    run_once,
    run_until_signal,
    verbose_option,
)
from labmeter.statefile import StateFileError


@click.group("agent")
def agent_group() -> None:
    """Run and manage the agent beside the instruments."""


@agent_group.command("enroll")
@config_option("agent.toml")
@click.option("--force", is_flag=True, help="Replace an existing key.")
@click.option(
    "--collector-key",
    help="The collector's public key (ed25519:..., from `labmeter collector key`): pinned in the config.",
)
def agent_enroll(cfg_path: Path, force: bool, collector_key: str | None) -> None:
    """Create the agent's Ed25519 key (mode 0600; on Windows an ACL) and print the command that registers it.

    With --collector-key, also pin the collector's key ([agent] collector_key in the config), so the agent
    obeys only acknowledgements that collector signed.
    """
    cfg = load_agent(cfg_path)
    if collector_key is not None:
        try:
            collector_key = signing.public_key_text(signing.parse_public_key(collector_key))
        except signing.KeyFileError as exc:
            fail(f"--collector-key: {exc}")
    if cfg.agent.key_file.exists() and not force and collector_key is not None:
        click.echo(f"key {cfg.agent.key_file} exists; kept")
        key = None
    else:
        try:
            key = signing.generate_key_file(cfg.agent.key_file, force=force)
        except signing.KeyFileError as exc:
            fail(str(exc))
    if collector_key is not None:
        _pin_collector_key(cfg_path, collector_key)
    if key is None:
        return
    pub = signing.public_key_text(key.public_key())
    protection = "readable by SYSTEM, Administrators and you only" if winsys.WINDOWS else "mode 0600"
    click.echo(f"key written to {cfg.agent.key_file} ({protection})")
    click.echo(f"public key: {pub}")
    inst = " ".join(f"--instrument {i.id}" for i in cfg.instrument)
    click.echo("register it on the collector with:")
    click.echo(f"  labmeter collector add-agent {cfg.agent.id} --key {pub} {inst}")


def _pin_collector_key(cfg_path: Path, key_text: str) -> None:
    """Write ``[agent] collector_key`` into the agent's config, keeping its comments."""
    import tomlkit

    doc = tomlkit.parse(cfg_path.read_text(encoding="utf-8"))
    section = doc.get("agent")
    if not isinstance(section, dict):
        fail(f"{cfg_path}: no [agent] table")
    section["collector_key"] = key_text
    cfg_path.write_text(tomlkit.dumps(doc), encoding="utf-8")
    fingerprint = signing.key_id(signing.parse_public_key(key_text))
    click.echo(f"collector key {fingerprint} pinned in {cfg_path}:")
    click.echo(f'  [agent] collector_key = "{key_text}"')


@agent_group.command("run")
@config_option("agent.toml")
@verbose_option
def agent_run(cfg_path: Path, verbose: bool) -> None:
    """Poll the instruments and send signed intervals to the collector."""
    log.setup(verbose)
    cfg = load_agent(cfg_path)
    from labmeter.agent.runtime import run_agent

    try:
        run_until_signal(lambda stop: run_agent(cfg, stop))
    except (config.ConfigError, signing.KeyFileError) as exc:
        fail(str(exc))
    except StateFileError as exc:
        fail(exc.message(cfg_path))


@agent_group.command("probe")
@config_option("agent.toml")
@click.option("--instrument", help="Probe only this instrument (and not the broker link).")
@click.option("--reads", type=int, default=3, show_default=True, help="Reads per instrument.")
def agent_probe(cfg_path: Path, instrument: str | None, reads: int) -> None:
    """Read each source a few times: raw value, power, state, and what is wrong if it fails; then the
    agent's own broker link. Exit status 1 when anything is not OK."""
    from labmeter.agent.probe import probe

    log.setup(quiet=True)
    cfg = load_agent(cfg_path)
    if instrument and instrument not in {i.id for i in cfg.instrument}:
        fail(f"{cfg_path}: no instrument {instrument!r}")
    results = run_once(probe(cfg, instrument, reads, link=instrument is None))
    for r in results:
        click.echo(f"{r.instrument}:")
        for line in r.lines:
            click.echo(f"  {line}")
        click.echo(f"  {r.verdict}: {r.diagnosis}")
    sys.exit(0 if all(r.ok for r in results) else 1)


@agent_group.command("calibrate")
@config_option("agent.toml")
@click.option("--instrument", required=True, help="The instrument to record.")
@click.option(
    "--minutes",
    type=float,
    default=10,
    show_default=True,
    help="How long to record; run the instrument through off, standby and a measurement meanwhile.",
)
@click.option("--write", is_flag=True, help="Write the suggested thresholds into the config (comments kept).")
def agent_calibrate(cfg_path: Path, instrument: str, minutes: float, write: bool) -> None:
    """Record power, find the off/standby/running levels and suggest thresholds."""
    import time

    from labmeter.agent.calibrate import Progress, find_levels, record, suggest, write_states

    log.setup(quiet=True)
    cfg = load_agent(cfg_path)
    inst = next((i for i in cfg.instrument if i.id == instrument), None)
    if inst is None:
        fail(f"{cfg_path}: no instrument {instrument!r}")
    click.echo(f"recording {instrument} for {minutes:g} min (every {inst.poll_s:g} s)...")
    tty = sys.stdout.isatty()
    shown = [-1e9]

    def show(p: Progress) -> None:  # in place twice a second on a terminal, else a line every 15 s
        now = time.monotonic()
        if now - shown[0] < (0.5 if tty else 15.0):
            return
        shown[0] = now
        click.echo(f"\r  {p.line()}\x1b[K" if tty else f"  {p.line()}", nl=not tty)

    values, errors = run_once(record(cfg, inst, minutes * 60, show))
    if tty:
        click.echo()
    click.echo(f"{len(values)} reading(s), {errors} failed")
    try:
        s = suggest(find_levels(values))
    except ValueError as exc:
        fail(str(exc), code=1)
    for name, level in zip(
        ("off", "standby", "running") if len(s.levels) == 3 else ("low", "high"), s.levels, strict=False
    ):
        click.echo(
            f"  {name:<8} {level.mean_w:9.1f} W  ({level.low_w:.1f}-{level.high_w:.1f} W, "
            f"{100 * level.share:.0f}% of the time)"
        )
    click.echo(
        f"suggested: off_below_w = {s.off_below_w:g}, run_above_w = {s.run_above_w:g}, "
        f"hysteresis_w = {s.hysteresis_w:g}"
    )
    if write:
        write_states(cfg_path, instrument, s)
        click.echo(f"written to {cfg_path}")


@agent_group.command("install")
@config_option(str(winsys.program_data() / "agent.toml") if winsys.WINDOWS else "/etc/labmeter/agent.toml")
@click.option("--dry-run", is_flag=True, help="Print the unit instead of installing it.")
@click.option(
    "--unit-dir", type=click.Path(path_type=Path), default=Path("/etc/systemd/system"), show_default=True
)
@click.option("--no-enable", is_flag=True, help="Write the unit but do not enable and start it.")
@click.option(
    "--exe",
    type=click.Path(path_type=Path),
    help="The labmeter executable the unit runs (default: the one on PATH, e.g. a venv's bin/labmeter).",
)
def agent_install(cfg_path: Path, dry_run: bool, unit_dir: Path, no_enable: bool, exe: Path | None) -> None:
    """Validate the config, then write, enable and start the labmeter-agent systemd unit
    (on Windows: register and start the labmeter-agent service)."""
    import shutil
    import subprocess

    from labmeter.agent import install

    cfg = load_agent(cfg_path)
    if winsys.WINDOWS:
        _windows_install(cfg_path, cfg, dry_run, no_enable)
        return
    program = str(exe) if exe else shutil.which("labmeter") or str(Path(sys.argv[0]).resolve())
    unit = install.systemd_unit(program, cfg_path)
    found = install.sandbox_problems(unit, cfg_path, cfg, program)
    if found:
        fail(
            f"{cfg_path}: the labmeter-agent unit (ProtectSystem=strict, ProtectHome, PrivateTmp) would not "
            "start with this config:\n  " + "\n  ".join(found)
        )
    if not cfg.agent.key_file.exists() and not dry_run:
        fail(f"{cfg.agent.key_file}: no key yet; run `labmeter agent enroll --config {cfg_path}` first")
    if dry_run:
        click.echo(unit, nl=False)
        return
    target = unit_dir / install.UNIT_NAME
    target.write_text(unit, encoding="utf-8")
    click.echo(f"written {target}")
    if not no_enable:
        for cmd in (
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "labmeter-agent.service"],
        ):
            if subprocess.run(cmd).returncode != 0:
                fail(f"`{' '.join(cmd)}` failed")
        click.echo("labmeter-agent enabled and started; `journalctl -u labmeter-agent -f` shows its log")


def _windows_install(cfg_path: Path, cfg: config.AgentConfig, dry_run: bool, no_start: bool) -> None:
    from labmeter.agent import winservice

    try:
        signing.load_private_key(cfg.agent.key_file)
    except signing.KeyFileError as exc:
        fail(f"{exc}; run `labmeter agent enroll --config {cfg_path}` first")
    command = winsys.service_command(sys.executable, cfg_path.resolve())
    if dry_run:
        click.echo(f"service {winsys.SERVICE_NAME}: {command}")
        return
    try:
        winservice.install(command, start=not no_start)
    except winservice.ServiceError as exc:
        fail(str(exc))
    click.echo(f"service {winsys.SERVICE_NAME} installed (automatic start, restarted on failure): {command}")
    if not no_start:
        click.echo(
            f"started; its log is {cfg.agent.state_dir / 'agent.log'}, `sc query {winsys.SERVICE_NAME}`"
        )


@agent_group.command("uninstall")
@config_option(str(winsys.program_data() / "agent.toml") if winsys.WINDOWS else "/etc/labmeter/agent.toml")
def agent_uninstall(cfg_path: Path) -> None:
    """Stop and remove the labmeter-agent service (Windows) or systemd unit; key and state are kept."""
    if winsys.WINDOWS:
        from labmeter.agent import winservice

        try:
            winservice.uninstall()
        except winservice.ServiceError as exc:
            fail(str(exc))
        click.echo(f"service {winsys.SERVICE_NAME} stopped and removed; key and state are kept")
        return
    import subprocess

    subprocess.run(["systemctl", "disable", "--now", "labmeter-agent.service"])
    unit = Path("/etc/systemd/system/labmeter-agent.service")
    with contextlib.suppress(FileNotFoundError):
        unit.unlink()
    subprocess.run(["systemctl", "daemon-reload"])
    click.echo("labmeter-agent disabled and removed; key and state are kept")


@agent_group.command("service", hidden=True)
@config_option(str(winsys.program_data() / "agent.toml"))
def agent_service(cfg_path: Path) -> None:
    """What the Windows service control manager starts (registered by `agent install`)."""
    if not winsys.WINDOWS:
        fail("`agent service` is the Windows service's entry point; on Linux use `agent run` under systemd")
    from labmeter.agent import winservice

    winservice.host(cfg_path)


@agent_group.command("status")
@config_option("agent.toml")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def agent_status(cfg_path: Path, as_json: bool) -> None:
    """Show the outbox: what waits for the collector's acknowledgement, what it rejected, and whether
    the state file is sound (PRAGMA integrity_check; exit status 1 if not)."""
    from labmeter.agent.control import load_pin

    cfg = load_agent(cfg_path)
    store = open_store(cfg, cfg_path)
    problems = store.check(full=True)
    summary = store.summary()
    store.close()
    try:
        pin = load_pin(cfg.agent)
        summary["collector_key"] = (
            {"fingerprint": pin.fingerprint, "key": pin.text, "source": pin.source} if pin else None
        )
        pinned = (
            f"collector key {pin.fingerprint}, pinned from {pin.source}"
            if pin
            else "collector key: not pinned yet (the first signed acknowledgement will pin one)"
        )
    except signing.KeyFileError as exc:
        summary["collector_key"] = {"error": str(exc)}
        pinned = f"collector key: {exc}"
    if as_json:
        click.echo(json.dumps({**summary, "integrity": problems or "ok"}, indent=2))
        sys.exit(1 if problems else 0)
    chain = summary["chain"]
    pending = summary["pending"]
    dead = summary["dead"]
    assert isinstance(chain, dict) and isinstance(pending, dict) and isinstance(dead, list)

    def local(ts: float, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
        """Local time with its UTC offset, as in the agent's log."""
        return datetime.fromtimestamp(ts).astimezone().strftime(f"{fmt} %z")

    click.echo(f"agent {cfg.agent.id} (times are local, {datetime.now().astimezone():UTC%z})")
    click.echo(f"  {pinned}")
    for inst in cfg.instrument:
        p = pending.get(inst.id)
        waiting = (
            f"{p['count']} waiting for acknowledgement (oldest from {local(p['oldest'])})"
            if p
            else "all acknowledged"
        )
        c = chain.get(inst.id)
        if c is None:
            emitted = "nothing emitted yet"
        else:  # a chain that began at the clock says when; one from an older version began at seq 1
            emitted = f"{c['seq'] - c['first'] + 1} interval(s) emitted" + (
                f" since {local(c['first'] / 1000, '%Y-%m-%d %H:%M')}" if c["first"] > 1 else ""
            )
        click.echo(f"  {inst.id}: {emitted}, {waiting}")
    if dead:
        click.echo(f"rejected by the collector ({len(dead)}); fix the cause, then `labmeter agent resend`:")
        for d in dead[-20:]:
            click.echo(f"  {d['instrument']} seq {d['seq']} at {local(d['at'])}: {d['reason']}")
    path = cfg.agent.state_dir / "agent.db"
    if problems:
        click.echo(f"state file {path}: DAMAGED (integrity_check: {'; '.join(problems)})")
        click.echo(f"  restore it from a backup, or: labmeter agent reset-state --config {cfg_path}")
        sys.exit(1)
    click.echo(f"state file {path}: OK (integrity_check)")


@agent_group.command("resend")
@config_option("agent.toml")
def agent_resend(cfg_path: Path) -> None:
    """Put rejected messages back in the outbox, once their cause is fixed."""
    cfg = load_agent(cfg_path)
    store = open_store(cfg, cfg_path)
    n = store.resend_dead()
    store.close()
    click.echo(f"{n} message(s) queued again")


@agent_group.command("reset-state")
@config_option("agent.toml")
@click.option(
    "--force", is_flag=True, help="Also when the file is sound: its unacknowledged intervals are lost."
)
def agent_reset_state(cfg_path: Path, force: bool) -> None:
    """Move a damaged state file (agent.db) aside, so that the next start begins new chains.

    Stop the agent first. The old file stays beside the new one, renamed agent.db.damaged-<UTC time>.
    """
    from labmeter.agent.outbox import AgentStore

    cfg = load_agent(cfg_path)
    path = cfg.agent.state_dir / "agent.db"
    problem = reset_precheck(
        path, force, lambda: AgentStore(path), lambda s: s.pending_count(), "interval(s) not yet acknowledged"
    )
    target = move_aside(path)
    click.echo(f"moved {path} to {target} ({problem})")
    click.echo(
        "the next `labmeter agent run` starts new chains above the old seqs; what the old file held "
        "that the collector had not acknowledged is not sent (the collector reports that time as no data)"
    )
