"""Config types and the TOML loader.

One place defines every key of ``agent.toml`` and ``collector.toml``, except each driver's
``[instrument.source]`` table, which its driver folder defines (``drivers/<name>/__init__.py``).
A bad key or value stops start-up with the file, the line, the key and what was expected.
Validation is msgspec: strict, and light enough for an agent that runs for years.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta, Struct, field

from labmeter import winsys
from labmeter.netutil import redact_text, redact_url, split_listen

ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
Id = Annotated[str, Meta(pattern=ID_PATTERN)]


class ConfigError(Exception):
    """A config problem, already worded for the user (file, line, key, hint)."""


class Section(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class BrokerConfig(Section, frozen=True, kw_only=True):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    client_id: str | None = None

    def __post_init__(self) -> None:
        if not re.match(r"^mqtts?://[^/:]+(:\d+)?/?$", self.url):
            raise ValueError(
                f"url must be mqtt://host[:port] or mqtts://host[:port] (got {redact_url(self.url)!r})"
            )


def _default_state_dir() -> Path:
    """Windows: ``%ProgramData%\\labmeter``; elsewhere none (the key must be placed on purpose)."""
    return winsys.program_data() if winsys.WINDOWS else Path()


def _default_key_file() -> Path:
    return winsys.program_data() / "agent.key" if winsys.WINDOWS else Path()


class AgentSection(Section, frozen=True, kw_only=True):
    id: Id
    key_file: Path = field(default_factory=_default_key_file)
    state_dir: Path = field(default_factory=_default_state_dir)
    bucket_s: Annotated[int, Meta(ge=60, le=86400)] = 3600
    checkpoint_s: Annotated[float, Meta(gt=0, le=300)] = 5
    heartbeat_s: Annotated[float, Meta(gt=0, le=3600)] = 30
    resend_after_s: Annotated[float, Meta(gt=0, le=3600)] = 30
    open_every_s: Annotated[float, Meta(gt=0, le=3600)] = 10
    collector_key: str | None = None
    """The collector's public key ("ed25519:..."), pinned: only acknowledgements it signed count."""

    def __post_init__(self) -> None:
        for name in ("key_file", "state_dir"):
            if getattr(self, name) == Path():
                example = "/var/lib/labmeter/agent.key" if name == "key_file" else "/var/lib/labmeter"
                raise ValueError(f"{name} is needed, e.g. {name} = {example!r}")
        if 86400 % self.bucket_s:
            raise ValueError(
                f"bucket_s must divide a day evenly, e.g. 900, 1800 or 3600 (got {self.bucket_s})"
            )


class Source(Section, tag_field="driver", frozen=True, kw_only=True):
    """What every driver's ``[instrument.source]`` table is: each driver subclasses it with its tag.

    The core names no driver; the drivers' list (``labmeter.drivers.DRIVERS``) closes the union
    that ``AgentConfig[...]`` is loaded with.
    """

    @property
    def gives_status(self) -> bool:
        """True when the source reports a state itself, so it needs no power thresholds."""
        return False


S = TypeVar("S", bound=Source)


class StatesConfig(Section, frozen=True, kw_only=True):
    off_below_w: Annotated[float, Meta(ge=0)]
    run_above_w: Annotated[float, Meta(gt=0)]
    hysteresis_w: Annotated[float, Meta(ge=0)] = 0
    min_dwell_s: Annotated[float, Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        if self.run_above_w <= self.off_below_w:
            raise ValueError(
                f"run_above_w must be above off_below_w (got {self.run_above_w:g} and {self.off_below_w:g})"
            )


class InstrumentConfig(Section, Generic[S], frozen=True, kw_only=True):
    id: Id
    poll_s: Annotated[float, Meta(gt=0, le=3600)] = 1
    stale_after_s: Annotated[float, Meta(gt=0)] = 30
    source: S
    states: StatesConfig | None = None

    def __post_init__(self) -> None:
        if self.states is None and not self.source.gives_status:
            raise ValueError(
                "states is missing: a power source needs [instrument.states] off_below_w and run_above_w"
            )

    @property
    def thresholds(self) -> StatesConfig:
        """The power thresholds (status sources need none; these never apply to them)."""
        return self.states or StatesConfig(off_below_w=0.5, run_above_w=1.0)


class AgentConfig(Section, Generic[S], frozen=True, kw_only=True):
    """``agent.toml``; load it as ``labmeter.drivers.registry.agent_config()``, which fills in the sources."""

    agent: AgentSection
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    instrument: Annotated[list[InstrumentConfig[S]], Meta(min_length=1)]
    profiles_dir: Path | None = None

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for inst in self.instrument:
            if inst.id in seen:
                raise ValueError(f"instrument ids must be unique ({inst.id!r} appears twice)")
            seen.add(inst.id)


class CollectorSection(Section, frozen=True, kw_only=True):
    data_dir: Path
    ledger: str = "sqlite"
    max_future_s: Annotated[float, Meta(ge=0)] = 300
    key_file: Path | None = None
    """The collector's own signing key (acknowledgements, countersigned evidence); default data_dir/collector.key.
    Collectors that share a ledger share this key, since agents pin one."""

    @property
    def key_path(self) -> Path:
        return self.key_file or self.data_dir / "collector.key"


class CollectorBroker(BrokerConfig, frozen=True, kw_only=True):
    embedded: bool = False
    listen: str = "127.0.0.1:1883"
    shared_group: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        split_listen(self.listen)


class PolicyConfig(Section, frozen=True, kw_only=True):
    prep_allowance_s: Annotated[int, Meta(ge=0)] = 900
    post_allowance_s: Annotated[int, Meta(ge=0)] = 600
    rated_hours_general: Annotated[float, Meta(gt=0)] = 1400
    rated_hours_special: Annotated[float, Meta(gt=0)] = 800
    timezone: str = "Asia/Shanghai"  # local days and months of the rollups behind reports
    # report reconcile (docs/reconcile.md): when a booking, a sign-in or idle time becomes a finding
    unused_booking_run_s: Annotated[int, Meta(ge=0, le=86_400)] = 300
    unattributed_min_s: Annotated[int, Meta(ge=0, le=86_400)] = 900
    signin_window_s: Annotated[int, Meta(ge=0, le=86_400)] = 1800
    idle_min_s: Annotated[int, Meta(ge=0, le=7 * 86_400)] = 7200
    overlap_min_s: Annotated[int, Meta(ge=0, le=86_400)] = 300
    # report reconcile: electricity price in yuan (元) per kWh; unset, records show energy but no cost
    tariff_yuan_per_kwh: Annotated[float, Meta(ge=0, le=1000)] | None = None

    def __post_init__(self) -> None:
        _check_zone(self.timezone)


def _check_zone(name: str) -> None:
    try:
        ZoneInfo(name)
    except (ValueError, ZoneInfoNotFoundError):
        raise ValueError(f"timezone {name!r} is not a known time zone (e.g. 'Asia/Shanghai')") from None


class WebConfig(Section, frozen=True, kw_only=True):
    listen: str = "127.0.0.1:8080"
    token_file: Path | None = None
    timezone: str = "Asia/Shanghai"
    public: bool = False  # a read-only /public view without login: states and utilisation, no user data
    public_power: bool = False  # show power readings in the public view

    def __post_init__(self) -> None:
        _check_zone(self.timezone)
        split_listen(self.listen)


class InfluxConfig(Section, frozen=True, kw_only=True):
    """Any server speaking the InfluxDB v2 write API (InfluxDB 2.x/3.x, VictoriaMetrics)."""

    url: str
    org: str = "lab"
    bucket: str = "labmeter"
    token_file: Path | None = None
    every_s: Annotated[float, Meta(gt=0, le=3600)] = 5.0


_HTTP_URL = re.compile(r"^https?://[^/?#\s]+(/[^\s]*)?$")


def _check_http_url(url: str, key: str = "url") -> None:
    if not _HTTP_URL.match(url):
        raise ValueError(f"{key} must be http://... or https://... (got {redact_url(url)!r})")


class AlertChannel(Section, frozen=True, kw_only=True):
    name: Annotated[str, Meta(pattern=ID_PATTERN)] | None = None
    """Names the channel in logs, in ``alert-test`` and in the delivery queue; default kind-N (webhook-1)."""


class WebhookChannel(AlertChannel, frozen=True, kw_only=True):
    """Any HTTP endpoint: each alert as a JSON POST (docs/alerts.md gives the body)."""

    url: str
    token_file: Path | None = None  # sent as Authorization: Bearer <token>

    def __post_init__(self) -> None:
        _check_http_url(self.url)


class WecomChannel(AlertChannel, frozen=True, kw_only=True):
    """A WeCom (企业微信) group robot: its webhook key in ``key_file``."""

    key_file: Path
    url: str = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send"

    def __post_init__(self) -> None:
        _check_http_url(self.url)


class DingtalkChannel(AlertChannel, frozen=True, kw_only=True):
    """A DingTalk (钉钉) group robot: its access_token in ``token_file``; with 加签, the SEC... secret in
    ``secret_file``."""

    token_file: Path
    secret_file: Path | None = None
    url: str = "https://oapi.dingtalk.com/robot/send"

    def __post_init__(self) -> None:
        _check_http_url(self.url)


class EmailChannel(AlertChannel, frozen=True, kw_only=True):
    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] = 587
    starttls: bool = True
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None  # the CA that signed the server's certificate, if not a public one
    sender: Annotated[str, Meta(pattern=r"^[^@\s<>]+@[^@\s<>]+$")]
    to: Annotated[list[Annotated[str, Meta(pattern=r"^[^@\s<>,]+@[^@\s<>,]+$")]], Meta(min_length=1)]

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together: set both, or neither")
        if self.username is not None and not self.starttls:
            raise ValueError("starttls is false but a password is set: it would cross the network in clear")


class AlertsConfig(Section, frozen=True, kw_only=True):
    """``[alerts]``: when to tell someone that something stopped, and where. A rule set to 0 is off."""

    lang: Literal["zh-CN", "en"] = "zh-CN"
    check_every_s: Annotated[float, Meta(ge=1, le=3600)] = 30
    agent_silent_min: Annotated[float, Meta(ge=0, le=10080)] = 10
    unknown_min: Annotated[float, Meta(ge=0, le=10080)] = 30
    no_intervals_min: Annotated[float, Meta(ge=0, le=10080)] = 60
    coverage_below_pct: Annotated[float, Meta(ge=0, le=100)] = 0
    """An instrument whose previous day's data coverage is below this; checked once a day after 01:00."""
    remind_h: Annotated[float, Meta(ge=0, le=720)] = 0  # 0: an active alert is sent once, never repeated
    max_attempts: Annotated[int, Meta(ge=1, le=50)] = 8
    webhook: list[WebhookChannel] = []
    wecom: list[WecomChannel] = []
    dingtalk: list[DingtalkChannel] = []
    email: list[EmailChannel] = []

    def __post_init__(self) -> None:
        names = [name for name, _ in self.channels()]
        if not names:
            raise ValueError(
                "no channel to send alerts to: add [[alerts.wecom]], [[alerts.dingtalk]], [[alerts.webhook]] "
                "or [[alerts.email]]"
            )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"alerts channel names must be unique ({dup[0]!r} appears twice)")

    def channels(self) -> list[tuple[str, AlertChannel]]:
        """(name, channel) of every configured channel, in a fixed order."""
        out: list[tuple[str, AlertChannel]] = []
        for kind in ("wecom", "dingtalk", "webhook", "email"):
            for i, ch in enumerate(getattr(self, kind)):
                out.append((ch.name or f"{kind}-{i + 1}", ch))
        return out

    def secret_files(self) -> list[tuple[Path, str]]:
        out: list[tuple[Path, str]] = []
        for name, ch in self.channels():
            for attr in ("token_file", "key_file", "secret_file", "password_file"):
                path = getattr(ch, attr, None)
                if path is not None:
                    out.append((path, f"alerts {name} {attr.removesuffix('_file')} file"))
        return out


class CollectorConfig(Section, frozen=True, kw_only=True):
    collector: CollectorSection
    broker: CollectorBroker = field(default_factory=CollectorBroker)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    web: WebConfig | None = None
    influxdb: InfluxConfig | None = None
    alerts: AlertsConfig | None = None

    def __post_init__(self) -> None:
        if self.broker.shared_group and not self.collector.ledger.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError(
                f"broker shared_group = {self.broker.shared_group!r} needs a PostgreSQL ledger "
                "(collector.ledger = 'postgresql://...'): it splits messages between collectors, "
                "which must then share one ledger"
            )


M = TypeVar("M", bound=Struct)


def check_secret_files(cfg: CollectorConfig) -> None:
    """Read every secret file the collector will need, so a bad one stops start-up before anything listens."""
    web, influx = cfg.web, cfg.influxdb
    for path, what in (
        (web.token_file if web else None, "web token file"),
        (influx.token_file if influx else None, "InfluxDB token file"),
        (cfg.broker.password_file if cfg.broker.username else None, "password file"),
        *(cfg.alerts.secret_files() if cfg.alerts else ()),
    ):
        if path is not None:
            read_secret(path, what)


def read_secret(path: Path, what: str) -> str:
    """A token or password kept in its own file (``token_file``, ``password_file``): the file must be readable
    and not empty, or start-up stops naming it. The value is hidden from every log line of this process."""
    from labmeter import log

    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read {what} ({reason})") from None
    if not value:
        raise ConfigError(f"{path}: {what} is empty; put the secret in it (one line)")
    log.hide(value)
    return value


def load(path: Path, model: type[M]) -> M:
    """Read and validate a TOML file; relative paths inside are taken from the file's folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    return parse(text, model, str(path), base=path.parent)


def parse(text: str, model: type[M], name: str = "<config>", base: Path | None = None) -> M:
    if getattr(model, "__parameters__", ()):
        raise TypeError(
            f"{model.__name__} is generic: load it with its types filled in, e.g. registry.agent_config()"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: TOML syntax error: {exc}") from None
    try:
        cfg = msgspec.convert(data, model, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(redact_text(_describe(str(exc), data, text, name, model))) from None
    if winsys.WINDOWS:
        _refuse_posix_paths(cfg, name)
    return _rebase(cfg, base) if base is not None else cfg


def _refuse_posix_paths(cfg: Struct, name: str) -> None:
    """On Windows ``/var/lib/labmeter`` has no drive and would silently become ``C:\\var\\lib\\labmeter``."""

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, Path) and winsys.posix_rooted(str(obj)):
            raise ConfigError(
                f"{name}: {where} = {str(obj)!r} is a POSIX path; on Windows give a full path such as "
                f"'C:\\ProgramData\\labmeter\\...' (or leave the key out for the default in %ProgramData%)"
            )
        if isinstance(obj, Struct):
            for k in obj.__struct_fields__:
                walk(getattr(obj, k), f"{where}.{k}" if where else k)
        elif isinstance(obj, list):
            for i, x in enumerate(obj):
                walk(x, f"{where}[{i}]")

    walk(cfg, "")


def replace(cfg: M, **changes: Any) -> M:
    return msgspec.structs.replace(cfg, **changes)


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Path and isinstance(obj, str):
        return Path(obj)
    raise NotImplementedError


def _rebase(cfg: M, base: Path) -> M:
    """Make relative paths relative to the config file, not to wherever the command runs."""

    def fix(obj: Any) -> Any:
        if isinstance(obj, Path):
            return obj if obj.is_absolute() else (base / obj)
        if isinstance(obj, Struct):
            changes = {k: fix(getattr(obj, k)) for k in obj.__struct_fields__}
            return msgspec.structs.replace(obj, **changes)
        if isinstance(obj, list):
            return [fix(x) for x in obj]
        return obj

    fixed: M = fix(cfg)
    return fixed


_KINDS = {
    "float": "a number",
    "int": "a whole number",
    "str": "text in quotes",
    "bool": "true or false",
    "array": "a list",
    "object": "a table",
}
_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _describe(error: str, data: dict[str, Any], text: str, name: str, model: type[Struct]) -> str:
    m = _AT.match(error)
    msg, path = (m.group("msg"), _path(m.group("path"))) if m else (error, ())
    unknown = re.match(r"Object contains unknown field `(.+)`", msg)
    missing = re.match(r"Object missing required field `(.+)`", msg)
    if unknown:
        path = (*path, unknown.group(1))
    elif missing:
        path = (*path, missing.group(1))
    elif (first := msg.split(" ", 1)[0]) and _is_field(model, path, data, first):
        path = (*path, first)  # a cross-field check names its key first
    key = _dotted(path)
    line = locate_line(text, path)
    where = f"{name}:{line}" if line else name
    if unknown:
        known = _known_keys(model, path[:-1], data)
        close = difflib.get_close_matches(str(path[-1]), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
        return f"{where}: unknown key {key!r}{hint}"
    if missing:
        return f"{where}: missing key {key!r}"
    got = _value_at(data, path)
    expected = re.match(r"Expected `(\w+)`, got `\w+`$", msg)
    if expected:
        msg = f"expected {_KINDS.get(expected.group(1), expected.group(1))}"
    if path and path[-1] == "driver" and msg.startswith("Invalid value"):
        tags = _tags(model, path[:-1], data)
        msg = f"unknown driver; expected one of {', '.join(repr(t) for t in tags)}"
    msg = msg.replace("Invalid enum value", "unknown value").replace("Expected", "expected")
    scalar = got is not None and not isinstance(got, dict | list)
    shown = f" (got {got!r})" if scalar and repr(got) not in msg and "(got" not in msg else ""
    if ID_PATTERN in msg:
        msg = "use only letters, digits, '.', '_' and '-' (at most 64)"
    if first_word_is_key := (path and msg.startswith(f"{path[-1]} ")):
        return f"{where}: {key}: {msg.split(' ', 1)[1] if first_word_is_key else msg}"
    return f"{where}: {key}: {msg}{shown}"


def _is_field(model: type[Struct], path: tuple[Any, ...], data: Any, name: str) -> bool:
    return name in _known_keys(model, path, data)


def _path(text: str) -> tuple[Any, ...]:
    return tuple(int(i) if i else k for k, i in _PART.findall(text))


def _value_at(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        if (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data)
        ):
            data = data[part]
        else:
            return None
    return data


def _dotted(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _field(model: type[Struct], path: tuple[Any, ...], data: Any) -> tuple[Any, Any] | None:
    """The annotation of the key at ``path`` and the raw data there, following the union member
    each level's tag selects; None where the path leaves the schema."""
    cur: Any = model
    raw = data
    annotation: Any = model
    for part in path:
        if isinstance(part, int):
            raw = raw[part] if isinstance(raw, list) and part < len(raw) else None
            continue
        fields = {f.name: f.type for f in msgspec.structs.fields(cur)} if _is_struct(cur) else {}
        if part not in fields:
            return None
        raw = raw.get(part) if isinstance(raw, dict) else None
        annotation = fields[part]
        cur = _struct_of(annotation, raw)
    return annotation, raw


def _known_keys(model: type[Struct], path: tuple[Any, ...], data: Any) -> list[str]:
    found = _field(model, path, data)
    cur: Any = _struct_of(*found) if found else None
    return [f.name for f in msgspec.structs.fields(cur)] if _is_struct(cur) else []


def _is_struct(t: Any) -> bool:
    """A struct class, or a generic one with its parameters filled in (``AgentConfig[...]``)."""
    t = get_origin(t) or t
    return isinstance(t, type) and issubclass(t, Struct)


def _tags(model: type[Struct], path: tuple[Any, ...], data: Any) -> list[str]:
    """The tags a tagged union at ``path`` accepts (the drivers' names for a source)."""
    found = _field(model, path, data)
    members = _members(found[0]) if found else []
    return [str(s.__struct_config__.tag) for s in members if _is_struct(s)]


def _members(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if args is None or _is_struct(annotation):
        return [annotation]
    return [m for a in args if a is not type(None) for m in _members(a)]


def _struct_of(annotation: Any, raw: Any) -> Any:
    """The struct class behind an annotation, picking the union member the raw data's tag selects."""
    if _is_struct(annotation):
        return annotation
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    structs = [s for s in (_struct_of(a, raw) for a in args) if s is not None]
    if isinstance(raw, dict) and "driver" in raw:
        for s in structs:
            if getattr(s, "__struct_config__", None) and s.__struct_config__.tag == raw["driver"]:
                return s
    return structs[0] if structs else None


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.\-\"' ]+?)\s*=")


def locate_line(text: str, path: tuple[Any, ...]) -> int | None:
    """Line number (1-based) where ``path`` is set in TOML ``text``; the nearest enclosing table if the key is absent."""
    counters: dict[tuple[str, ...], int] = {}
    table: tuple[Any, ...] = ()
    best: tuple[int, int] | None = None
    for no, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            names = tuple(p.strip().strip("\"'") for p in header.group(2).split("."))
            table = _resolve(names, counters, header.group(1) == "[[")
            here = table
        else:
            key = _KEY.match(line)
            if not key:
                continue
            here = table + tuple(p.strip().strip("\"'") for p in key.group(1).split("."))
        n = _common(here, path)
        if n == len(here) and (best is None or n > best[0]):
            best = (n, no)
            if n == len(path):
                return no
    return best[1] if best and best[0] > 0 else None


def _resolve(names: tuple[str, ...], counters: dict[tuple[str, ...], int], is_array: bool) -> tuple[Any, ...]:
    out: list[Any] = []
    for i, name in enumerate(names):
        out.append(name)
        prefix = names[: i + 1]
        last = i == len(names) - 1
        if last and is_array:
            counters[prefix] = counters.get(prefix, -1) + 1
            # a new array element forgets the sub-tables of the previous one
            for k in [k for k in counters if len(k) > len(prefix) and k[: len(prefix)] == prefix]:
                del counters[k]
            out.append(counters[prefix])
        elif prefix in counters:
            out.append(counters[prefix])
    return tuple(out)


def _common(a: tuple[Any, ...], b: tuple[Any, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
