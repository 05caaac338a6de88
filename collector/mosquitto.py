"""Accounts for a secured Mosquitto: password-file lines (the ``$7$`` PBKDF2-SHA512 format of
mosquitto_passwd) and ACL blocks, each granting one client only the topics it needs.

Mosquitto 2 drops to the ``mosquitto`` user before it reads ``password_file`` and ``acl_file``
(at start and at every reload), and from 2.0.16 on it warns, "future versions will refuse to
load this file", unless such a file is owned by that user and group and unreadable by others.
So both files are written ``mosquitto:mosquitto`` mode 0600, atomically (a reader never sees
half a file), under a lock (two commands at once lose no account).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import grp
import hashlib
import os
import pwd
import re
import secrets
import tempfile
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from labmeter import wire
from labmeter.config import AgentConfig
from labmeter.drivers.mqtt import MqttSource

ITERATIONS = 101  # mosquitto_passwd's own default
BROKER_USER = "mosquitto"  # what Debian's mosquitto package runs as
# first topic levels of the formats' fixed layouts: a device whose own prefix is one of them would get
# write access to every other device of that format (an ESPHome node named "tele" writes tele/#)
SHARED_ROOTS = frozenset({"tele", "stat", "cmnd", "tasmota", "shellies", "zigbee2mqtt", "homeassistant"})
PLUG_FORMATS: tuple[str, ...] = typing.get_args(typing.get_type_hints(MqttSource)["format"])


class AccountError(ValueError):
    """A user name, topic or agent config that cannot become a safe account."""


def password_line(user: str, password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"{user}:$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def check_user(user: str) -> None:
    if not wire.ID_RE.match(user):
        raise AccountError(f"{user!r}: account names use letters, digits, '.', '_' and '-' only (at most 64)")


_TOPIC_RE = re.compile(r"^[^\s#+\x00-\x1f\x7f]+$")


def check_topic(topic: str, what: str) -> None:
    """A device topic that may go into an ACL: exact (no wildcard), printable, not labmeter's or $SYS."""
    if not _TOPIC_RE.match(topic) or topic.startswith("/") or "//" in topic or topic.endswith("/"):
        raise AccountError(
            f"{what}: topic {topic!r} must be a plain topic (no '+' or '#', spaces or empty levels)"
        )
    if topic.startswith(("$", wire.ROOT.split("/")[0] + "/")) or topic == wire.ROOT.split("/")[0]:
        raise AccountError(f"{what}: topic {topic!r} is reserved ($SYS or labmeter's own topics)")


def _lines(user: str, rules: Sequence[tuple[str, str]]) -> str:
    seen: list[tuple[str, str]] = []
    for rule in rules:
        if rule not in seen:
            seen.append(rule)
    return f"user {user}\n" + "".join(f"topic {access} {topic}\n" for access, topic in seen)


def collector_acl(user: str) -> str:
    return _lines(user, [("read", f"{wire.ROOT}/#"), ("write", wire.ack_topic("+"))])


def agent_acl(agent: str, plug_topics: Sequence[str] = ()) -> str:
    """Publish only the agent's own intervals, open intervals, sign-ins and status (not its ack topic,
    which only the collector writes); read its acks and exactly the plug topics its drivers subscribe to."""
    own = [
        ("write", wire.interval_topic(agent, "+")),
        ("write", wire.open_topic(agent, "+")),
        ("write", wire.signin_topic(agent, "+")),
        ("write", wire.status_topic(agent)),
        ("read", wire.ack_topic(agent)),
    ]
    return _lines(agent, own + [("read", t) for t in plug_topics])


def source_subscriptions(source: MqttSource) -> tuple[str, ...]:
    """The topics the mqtt driver subscribes to for this source (its topic, availability, extras,
    energy): the driver's own list, so the ACL follows the driver."""
    from labmeter.drivers.mqtt.driver import source_topics

    return source_topics(source)


@dataclass(frozen=True)
class AgentPlugs:
    topics: tuple[str, ...]
    elsewhere: tuple[str, ...]  # instruments whose source names its own broker: not this one's accounts


def agent_plug_topics(cfg: AgentConfig) -> AgentPlugs:
    topics: list[str] = []
    elsewhere: list[str] = []
    for inst in cfg.instrument:
        src = inst.source
        if not isinstance(src, MqttSource):
            continue
        if src.broker is not None:
            elsewhere.append(inst.id)
            continue
        for t in source_subscriptions(src):
            check_topic(t, f"instrument {inst.id}")
            topics.append(t)
    return AgentPlugs(tuple(dict.fromkeys(topics)), tuple(elsewhere))


def _levels(topic: str, fmt: str, expect: str) -> list[str]:
    parts = topic.split("/")
    if len(parts) < 2:
        raise AccountError(f"format {fmt}: topic {topic!r} is not of the form {expect}")
    return parts


@dataclass(frozen=True)
class Plug:
    """A device feed as an instrument reads it: ``[instrument.source]`` format, topic, availability_topic."""

    format: str
    topic: str
    availability_topic: str | None = None


def plug_acl(user: str, plugs: Sequence[Plug]) -> str:
    """What the devices behind one account publish and subscribe to, and nothing else (one account per
    device; a Zigbee2MQTT bridge, one client for many devices, gets the rules of each)."""
    check_user(user)
    if not plugs:
        raise AccountError(f"plug {user}: no topic given")
    rules: list[tuple[str, str]] = []
    for p in plugs:
        check_topic(p.topic, f"plug {user}")
        rules += _plug_rules(user, p.format, p.topic, p.availability_topic)
    return _lines(user, rules)


def _own_prefix(prefix: str, fmt: str, topic: str) -> None:
    if prefix in SHARED_ROOTS:
        raise AccountError(
            f"format {fmt}: topic {topic!r}: the device's prefix {prefix!r} is shared by other devices; "
            "it would be allowed to write all of theirs. Give the device its own name or prefix"
        )


def _plug_rules(user: str, fmt: str, topic: str, availability_topic: str | None) -> list[tuple[str, str]]:
    rules: list[tuple[str, str]]
    if fmt == "tasmota":  # tele/<t>/SENSOR; the device also writes stat/<t>/..., reads cmnd/<t>/...
        parts = _levels(topic, fmt, "tele/<topic>/SENSOR")
        if len(parts) != 3 or parts[0] != "tele":
            raise AccountError(f"format tasmota: topic {topic!r} is not tele/<topic>/SENSOR")
        t = parts[1]
        rules = [("write", f"tele/{t}/#"), ("write", f"stat/{t}/#"), ("read", f"cmnd/{t}/#")]
    elif fmt == "shelly-gen1":  # shellies/<id>/relay/0/power
        parts = _levels(topic, fmt, "shellies/<id>/relay/0/power")
        if parts[0] != "shellies" or len(parts) < 3:
            raise AccountError(f"format shelly-gen1: topic {topic!r} is not shellies/<id>/relay/0/power")
        rules = [("readwrite", f"shellies/{parts[1]}/#"), ("read", "shellies/command")]
    elif fmt == "shelly-gen2":  # <prefix>/status/switch:0
        parts = _levels(topic, fmt, "<prefix>/status/switch:0")
        if len(parts) < 3 or parts[-2] != "status":
            raise AccountError(f"format shelly-gen2: topic {topic!r} is not <prefix>/status/switch:0")
        prefix = "/".join(parts[:-2])
        _own_prefix(prefix, fmt, topic)
        rules = [("readwrite", prefix + "/#")]
    elif fmt == "zigbee2mqtt":  # <base>/<name>: the bridge publishes for its devices
        parts = _levels(topic, fmt, "zigbee2mqtt/<name>")
        base = parts[0]
        rules = [
            ("write", topic),
            ("write", f"{topic}/#"),
            ("read", f"{topic}/set"),
            ("read", f"{topic}/get"),
            ("readwrite", f"{base}/bridge/#"),
        ]
    elif fmt == "esphome":  # <node>/sensor/<name>/state; <node>/status
        parts = _levels(topic, fmt, "<node>/sensor/<name>/state")
        _own_prefix(parts[0], fmt, topic)
        rules = [("readwrite", f"{parts[0]}/#")]
    elif fmt == "json":
        rules = [("write", topic)]
        if availability_topic:
            check_topic(availability_topic, f"plug {user}")
            rules.append(("write", availability_topic))
    else:
        raise AccountError(f"format {fmt!r}: one of {', '.join(PLUG_FORMATS)}")
    return rules


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT topic filters."""
    xs, ys = a.split("/"), b.split("/")
    for x, y in zip(xs, ys, strict=False):
        if "#" in (x, y):
            return True
        if x != y and "+" not in (x, y):
            return False
    if len(xs) == len(ys):
        return True
    longer = xs if len(xs) > len(ys) else ys
    return longer[min(len(xs), len(ys))] == "#"  # "a/#" also matches "a"


def _writes(block: str) -> list[str]:
    return [
        line.split(None, 2)[2]
        for line in block.splitlines()
        if line.startswith(("topic write ", "topic readwrite "))
    ]


def blocks(acl_text: str) -> dict[str, str]:
    """Each account's block in an ACL file, by user."""
    out: dict[str, str] = {}
    for m in re.finditer(r"^user (\S+)[ \t]*\n((?:[ \t]*topic .*\n?)*)", acl_text, re.M):
        out[m.group(1)] = m.group(0)
    return out


def _check_no_overlap(user: str, block: str, acl_text: str) -> None:
    """A device account must not be able to write where another account writes (outside labmeter's own
    topics, which only agents write, each its own): else one plug could feed another's power."""
    mine = [t for t in _writes(block) if not t.startswith(wire.ROOT + "/")]
    for other, their_block in blocks(acl_text).items():
        if other == user:
            continue
        for theirs in _writes(their_block):
            if theirs.startswith(wire.ROOT + "/"):
                continue
            for t in mine:
                if filters_overlap(t, theirs):
                    raise AccountError(
                        f"account {user} would write {t}, where account {other} writes ({theirs}): "
                        "give the device its own topic or prefix"
                    )


def _replace_user(text: str, user: str, new: str, block: bool) -> str:
    """Drop ``user``'s old line (passwd) or block (``user`` line and the ``topic`` lines after it), keep
    everything else as it was (other accounts, comments, ``pattern`` lines), and append ``new``."""
    if block:
        pattern = re.compile(rf"^user {re.escape(user)}[ \t]*\n(?:[ \t]*topic .*\n)*", re.M)
    else:
        pattern = re.compile(rf"^{re.escape(user)}:.*\n", re.M)
    if text and not text.endswith("\n"):
        text += "\n"
    text = pattern.sub("", text)
    if block and text and not text.endswith("\n\n"):
        text += "\n"
    return text + new + ("" if new.endswith("\n") else "\n")


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    name: str


def broker_owner(name: str = BROKER_USER) -> Owner | None:
    """The broker's user and group, if it exists here and we may give it files (we are root)."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        return None
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        gid = user.pw_gid
    return Owner(user.pw_uid, gid, name)


def _write_atomic(path: Path, text: str, owner: Owner | None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            if owner is not None:
                os.fchown(f.fileno(), owner.uid, owner.gid)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".labmeter.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Account:
    secret: Path
    block: str
    owner: Owner | None
    new_password: bool  # False: the account existed and kept its password; only its ACL was rewritten
    warnings: tuple[str, ...] = ()


def add_account(
    directory: Path, user: str, block: str, new_password: bool = False, broker_user: str = BROKER_USER
) -> Account:
    """Create ``user`` in DIR/passwd and DIR/acl, or rewrite its ACL block (other accounts kept).

    A new account, or ``new_password``, gets a new password in DIR/secrets/USER.pass (0600, root's: it
    is copied to the client, never read by the broker); an existing one keeps its password, so that
    following a changed agent.toml does not lock the agent out."""
    check_user(user)
    owner = broker_owner(broker_user)
    if not directory.exists():
        directory.mkdir(parents=True)
        directory.chmod(0o755)  # whatever the umask: the broker's user must reach its files
    warnings = [] if owner is None else _unreachable(directory, owner)
    passwd, acl = directory / "passwd", directory / "acl"
    secret = directory / "secrets" / f"{user}.pass"
    with _locked(directory):
        old_pw = passwd.read_text(encoding="utf-8") if passwd.exists() else ""
        old_acl = acl.read_text(encoding="utf-8") if acl.exists() else ""
        _check_no_overlap(user, block, old_acl)
        exists = re.search(rf"^{re.escape(user)}:", old_pw, re.M) is not None
        fresh = new_password or not exists
        if fresh:
            password = secrets.token_urlsafe(24)
            secret.parent.mkdir(mode=0o700, exist_ok=True)
            _write_atomic(secret, password + "\n", None)
            old_pw = _replace_user(old_pw, user, password_line(user, password), block=False)
        _write_atomic(passwd, old_pw, owner)  # rewritten either way: owner and mode as Mosquitto wants
        _write_atomic(acl, _replace_user(old_acl, user, block, block=True), owner)
    return Account(secret, block, owner, fresh, tuple(warnings))


def _unreachable(directory: Path, owner: Owner) -> list[str]:
    """The folders on the way to ``directory`` that the broker's user cannot pass (a umask 077 mkdir)."""
    out = []
    for d in [directory.resolve(), *directory.resolve().parents]:
        st = d.stat()
        if st.st_uid == owner.uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == owner.gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            out.append(
                f"{d}: the {owner.name} user cannot enter it (mode {st.st_mode & 0o777:o}); chmod o+x {d}"
            )
    return out


def agent_plugs(cfg: AgentConfig, instruments: Sequence[str]) -> list[Plug]:
    """The plugs of these instruments of an agent's config, as their device accounts need them."""
    by_id = {i.id: i for i in cfg.instrument}
    plugs = []
    for name in instruments:
        inst = by_id.get(name)
        if inst is None:
            raise AccountError(f"no instrument {name!r} in the agent config (it has {', '.join(by_id)})")
        if not isinstance(inst.source, MqttSource):
            raise AccountError(f"instrument {name!r} is not read from an MQTT plug (driver = 'mqtt')")
        src = inst.source
        plugs.append(Plug(src.format, src.topic, src.availability_topic))
    return plugs
