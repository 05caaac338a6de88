"""Which acknowledgements the agent obeys: only those signed by the collector key it has pinned.

An ack makes the agent delete data, and anyone on the broker can publish on its ack topic (the
built-in broker has no accounts at all). So the agent pins one collector key: ``[agent]
collector_key`` in agent.toml (written by ``labmeter agent enroll --collector-key``), or, if none is
configured, the key of the first validly signed ack addressed to it (trust on first use, the upgrade
path), kept in ``state_dir/collector.pub``. Everything else is ignored with a rate-limited warning.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from labmeter import signing, wire
from labmeter.config import AgentSection

log = logging.getLogger("labmeter.agent")

PIN_FILE = "collector.pub"
WARN_EVERY_S = 60.0


@dataclass(frozen=True)
class Pin:
    key: signing.PublicKey
    text: str
    source: str
    """Where the key came from, for `labmeter agent status` and the log."""

    @property
    def fingerprint(self) -> str:
        return signing.key_id(self.key)


def pin_path(section: AgentSection) -> Path:
    return section.state_dir / PIN_FILE


def load_pin(section: AgentSection) -> Pin | None:
    """The pinned collector key: agent.toml first, else the one pinned on first use; None if neither.

    Raises KeyFileError (naming the file and key) for a key that does not parse.
    """
    if section.collector_key:
        try:
            key = signing.parse_public_key(section.collector_key)
        except signing.KeyFileError as exc:
            raise signing.KeyFileError(f"[agent] collector_key: {exc}") from None
        return Pin(key, signing.public_key_text(key), "agent.toml ([agent] collector_key)")
    path = pin_path(section)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise signing.KeyFileError(f"{path}: cannot read the pinned collector key ({exc})") from None
    line = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")), "")
    try:
        key = signing.parse_public_key(line)
    except signing.KeyFileError as exc:
        raise signing.KeyFileError(f"{path}: {exc}; delete the file to pin again on first use") from None
    since = datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return Pin(key, signing.public_key_text(key), f"first use, {since} ({path})")


def save_pin(section: AgentSection, key: signing.PublicKey) -> Path:
    path = pin_path(section)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        "# the collector key this agent pinned on first use; only acks signed with it count\n"
        f"{signing.public_key_text(key)}\n",
        encoding="ascii",
    )
    os.replace(tmp, path)
    return path


class AckGate:
    """Opens ack payloads: returns the acks that count, warns (rate-limited) about the rest."""

    def __init__(self, section: AgentSection, pin: Pin | None) -> None:
        self.section = section
        self.agent = section.id
        self.pin = pin
        self.ignored = 0
        self._warned: dict[str, float] = {}

    def open(self, payload: bytes) -> wire.Ack | None:
        if wire.is_legacy_ack(payload):
            return self._refuse(
                "legacy",
                "ignoring an unsigned acknowledgement: the collector needs upgrading (collectors first, "
                "then agents); nothing is deleted until it signs its acks",
            )
        try:
            env = wire.open_envelope(payload)
            ack = wire.decode_ack(env.body)
        except wire.WireError as exc:
            return self._refuse("unreadable", "ignoring an unreadable acknowledgement: %s", exc)
        if ack.agent != self.agent:
            return self._refuse("agent", "ignoring an acknowledgement addressed to agent %r", ack.agent[:64])
        if self.pin is not None:
            if not signing.verify(self.pin.key, env.body.encode(), env.sig):
                return self._refuse(
                    "signature",
                    "ignoring an acknowledgement not signed by the pinned collector key %s (it names key %s)",
                    self.pin.fingerprint,
                    env.kid[:16],
                )
            return ack
        try:
            key = signing.parse_public_key(ack.key)
        except signing.KeyFileError as exc:
            return self._refuse("unreadable", "ignoring an acknowledgement with an unusable key: %s", exc)
        if signing.key_id(key) != env.kid or not signing.verify(key, env.body.encode(), env.sig):
            return self._refuse("signature", "ignoring an acknowledgement whose signature does not check")
        self._pin_first_use(key)
        return ack

    def _pin_first_use(self, key: signing.PublicKey) -> None:
        path = save_pin(self.section, key)
        self.pin = Pin(key, signing.public_key_text(key), f"first use ({path})")
        log.warning(
            "pinned the collector key %s on first use (saved in %s); from now on only acks it signs count. "
            "Check the fingerprint with `labmeter collector key` on the collector and pin it explicitly "
            'in agent.toml under [agent]: collector_key = "%s"',
            self.pin.fingerprint,
            path,
            self.pin.text,
        )

    def _refuse(self, kind: str, message: str, *args: object) -> wire.Ack | None:
        self.ignore(kind, message, *args)
        return None

    def ignore(self, kind: str, message: str, *args: object) -> None:
        """Count and warn, at most once a minute per kind: a flood of forged acks must not flood the log."""
        self.ignored += 1
        now = time.monotonic()
        if now - self._warned.get(kind, -1e9) >= WARN_EVERY_S:
            self._warned[kind] = now
            log.warning(message, *args)
