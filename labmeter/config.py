"""Config types and the TOML loader.

One place defines every key of ``agent.toml`` and ``collector.toml``. A bad key or
value stops start-up with the file, the line, the key and what was expected.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


class ConfigError(Exception):
    """A config problem, already worded for the user (file, line, key, hint)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    client_id: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^mqtts?://[^/:]+(:\d+)?/?$", v):
            raise ValueError("expected mqtt://host[:port] or mqtts://host[:port]")
        return v


class AgentSection(Section):
    id: str = Field(pattern=ID_PATTERN)
    key_file: Path
    state_dir: Path
    bucket_s: int = Field(3600, ge=60, le=86400)
    checkpoint_s: float = Field(5, gt=0, le=300)
    heartbeat_s: float = Field(30, gt=0, le=3600)
    resend_after_s: float = Field(30, gt=0, le=3600)
    open_every_s: float = Field(10, gt=0, le=3600)

    @field_validator("bucket_s")
    @classmethod
    def _bucket(cls, v: int) -> int:
        if 86400 % v:
            raise ValueError("must divide a day evenly (e.g. 900, 1800, 3600)")
        return v


class ModbusSource(Section):
    driver: Literal["modbus"]
    url: str = Field(description="tcp://host:port or rtu:///dev/ttyUSB0?baud=9600&parity=N")
    profile: str
    device_id: int = Field(1, ge=0, le=247)
    timeout_s: float = Field(1.0, gt=0, le=30)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(tcp://[^/:]+(:\d+)?|rtu:///.+)$", v):
            raise ValueError("expected tcp://host:port or rtu:///dev/ttyX?baud=9600")
        return v


class MqttSource(Section):
    driver: Literal["mqtt"]
    topic: str
    format: Literal["tasmota"] = "tasmota"
    broker: BrokerConfig | None = None


Source = Annotated[ModbusSource | MqttSource, Field(discriminator="driver")]


class StatesConfig(Section):
    off_below_w: float = Field(ge=0)
    run_above_w: float = Field(gt=0)
    hysteresis_w: float = Field(0, ge=0)
    min_dwell_s: float = Field(0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> StatesConfig:
        if self.run_above_w <= self.off_below_w:
            raise ValueError(
                f"run_above_w ({self.run_above_w}) must be above off_below_w ({self.off_below_w})"
            )
        return self


class InstrumentConfig(Section):
    id: str = Field(pattern=ID_PATTERN)
    poll_s: float = Field(1, gt=0, le=3600)
    stale_after_s: float = Field(30, gt=0)
    source: Source
    states: StatesConfig


class AgentConfig(Section):
    agent: AgentSection
    broker: BrokerConfig = BrokerConfig()
    instrument: list[InstrumentConfig] = Field(min_length=1)
    profiles_dir: Path | None = None

    @model_validator(mode="after")
    def _unique(self) -> AgentConfig:
        seen: set[str] = set()
        for inst in self.instrument:
            if inst.id in seen:
                raise ValueError(f"instrument id {inst.id!r} appears twice")
            seen.add(inst.id)
        return self


class CollectorSection(Section):
    data_dir: Path
    ledger: str = "sqlite"
    max_future_s: float = Field(300, ge=0)
    ack_every_s: float = Field(0.2, gt=0, le=60)


class CollectorBroker(BrokerConfig):
    embedded: bool = False
    listen: str = "127.0.0.1:1883"
    shared_group: str | None = None


class PolicyConfig(Section):
    prep_allowance_s: int = Field(900, ge=0)
    post_allowance_s: int = Field(600, ge=0)
    rated_hours_general: float = Field(1400, gt=0)
    rated_hours_special: float = Field(800, gt=0)


class WebConfig(Section):
    listen: str = "127.0.0.1:8080"


class CollectorConfig(Section):
    collector: CollectorSection
    broker: CollectorBroker = CollectorBroker()
    policy: PolicyConfig = PolicyConfig()
    web: WebConfig | None = None


M = TypeVar("M", bound=BaseModel)


def load(path: Path, model: type[M]) -> M:
    """Read and validate a TOML file; relative paths inside are taken from the file's folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    return parse(text, model, str(path), base=path.parent)


def parse(text: str, model: type[M], name: str = "<config>", base: Path | None = None) -> M:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: TOML syntax error: {exc}") from None
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, data, text, name, model)) from None
    return _rebase(cfg, base) if base is not None else cfg


def _rebase(cfg: M, base: Path) -> M:
    """Make relative paths relative to the config file, not to wherever the command runs."""

    def fix(obj: Any) -> Any:
        if isinstance(obj, Path):
            return obj if obj.is_absolute() else (base / obj)
        if isinstance(obj, BaseModel):
            updates = {k: fix(getattr(obj, k)) for k in type(obj).model_fields}
            return obj.model_copy(update=updates)
        if isinstance(obj, list):
            return [fix(x) for x in obj]
        return obj

    fixed: M = fix(cfg)
    return fixed


def _describe(
    exc: ValidationError, data: dict[str, Any], text: str, name: str, model: type[BaseModel]
) -> str:
    lines = []
    for err in exc.errors():
        path = _clean_loc(err["loc"], data)
        if err["type"] == "union_tag_invalid":
            path = (*path, "driver")
            ctx = err.get("ctx", {})
            err = {
                **err,
                "msg": f"unknown driver; expected one of {ctx.get('expected_tags', '')}",
                "input": ctx.get("tag"),
            }
        key = _dotted(path)
        line = locate_line(text, path)
        where = f"{name}:{line}" if line else name
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, path[:-1], data)
            close = difflib.get_close_matches(str(path[-1]), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
            lines.append(f"{where}: unknown key {key!r}{hint}")
        elif err["type"] == "missing":
            lines.append(f"{where}: missing key {key!r}")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            lines.append(f"{where}: {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop pydantic's union tags from a location, keeping only keys that exist in the file's shape."""
    out: list[Any] = []
    cur = data
    for part in loc:
        if isinstance(cur, list) and isinstance(part, int):
            out.append(part)
            cur = cur[part] if part < len(cur) else None
        elif isinstance(cur, dict):
            if part in cur:
                out.append(part)
                cur = cur[part]
            elif isinstance(part, str) and part[:1].isalpha() and part not in ("modbus", "mqtt", "serial"):
                out.append(part)
                cur = None
        elif cur is None and isinstance(part, str) and not part.startswith("function-after"):
            out.append(part)
    return tuple(out)


def _dotted(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _known_keys(model: type[BaseModel], path: tuple[Any, ...], data: Any) -> list[str]:
    cur: Any = model
    raw = data
    for part in path:
        if isinstance(part, int):
            raw = raw[part] if isinstance(raw, list) and part < len(raw) else None
            continue
        raw = raw.get(part) if isinstance(raw, dict) else None
        field = cur.model_fields.get(part) if isinstance(cur, type) and issubclass(cur, BaseModel) else None
        if field is None:
            return []
        cur = _model_of(field.annotation, raw)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _model_of(annotation: Any, raw: Any) -> Any:
    """The model class behind an annotation, picking the union member the raw data's tag selects."""
    args = getattr(annotation, "__args__", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if not args:
        return None
    candidates = [_model_of(a, raw) for a in args]
    candidates = [c for c in candidates if c is not None]
    if isinstance(raw, dict) and "driver" in raw:
        for c in candidates:
            lit = getattr(c.model_fields.get("driver"), "annotation", None)
            if raw["driver"] in getattr(lit, "__args__", ()):
                return c
    return candidates[0] if candidates else None


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
