"""What `labmeter agent install` writes on Linux: the systemd unit for this config, and the check that its
sandbox (ProtectSystem=strict, ProtectHome, PrivateTmp) leaves every file the config names reachable."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from labmeter import config

UNIT_NAME = "labmeter-agent.service"


def systemd_unit(program: str, cfg_path: Path) -> str:
    """The shipped unit with this executable and this config in its ExecStart."""
    unit = resources.files("labmeter.systemd").joinpath(UNIT_NAME).read_text(encoding="utf-8")
    return unit.replace("/opt/labmeter/bin/labmeter", program).replace(
        "/etc/labmeter/agent.toml", str(cfg_path.resolve())
    )


def sandbox_problems(unit: str, cfg_path: Path, cfg: config.AgentConfig, exe: str) -> list[str]:
    """Files of the config that the unit's sandbox hides or keeps read-only, one line each (the agent
    logs to the journal, so there is no log file to check)."""
    from pathlib import PurePosixPath

    from labmeter import sandbox

    def real(p: Path | str) -> PurePosixPath:
        return PurePosixPath(os.path.realpath(p))

    reads = [("--config", real(cfg_path)), ("the labmeter executable", real(exe))]
    reads.append(("[agent] key_file", real(cfg.agent.key_file)))
    brokers: list[tuple[str, config.BrokerConfig]] = [("[broker]", cfg.broker)]
    for i in cfg.instrument:
        own = getattr(i.source, "broker", None)  # a source with its own broker (mqtt plugs)
        if isinstance(own, config.BrokerConfig):
            brokers.append((f"instrument {i.id} [instrument.source.broker]", own))
    for where, b in brokers:
        for name in ("password_file", "ca_file", "cert_file", "key_file"):
            value = getattr(b, name)
            if value is not None:
                reads.append((f"{where} {name}", real(value)))
    if cfg.profiles_dir is not None:
        reads.append(("profiles_dir", real(cfg.profiles_dir)))
    return sandbox.problems(
        sandbox.parse_unit(unit), reads, [("[agent] state_dir", real(cfg.agent.state_dir))]
    )
