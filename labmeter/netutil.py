"""Local ports for the demo, the simulators, the tests and the benchmarks; URLs as they may be shown."""

from __future__ import annotations

import re
import socket
import time
from urllib.parse import unquote, unquote_plus


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now: check-then-use, so another process may
    take it before the caller binds. Where a component can bind port 0 and report the port, prefer that."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) as the host and port to bind."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen {listen!r} is not host:port (e.g. 127.0.0.1:1883)")
    return host.strip("[]") or "127.0.0.1", int(port)


REDACTED = "***"
_SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "apikey", "api_key", "api-key")
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _secret_param(name: str) -> bool:
    """``password``, ``sslpassword``, ``token``, ``client_secret``, ``apikey``...; not ``passfile`` (a path)."""
    low = unquote(name).lower()
    return any(word in low for word in _SECRET_WORDS)


def url_secrets(url: str) -> list[str]:
    """The secret values in a URL (userinfo password, secret query parameters), raw and decoded."""
    _scheme, sep, rest = url.partition("://")
    if not sep:
        return []
    authority, _, tail = _split_authority(rest)
    found: list[str] = []
    userinfo, at, _host = authority.rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.partition(":")[2])
    query = re.sub(r"^[^?#]*[?#]", "", tail).replace("#", "&") if re.search(r"[?#]", tail) else ""
    for pair in re.split(r"[&;]", query):
        name, eq, value = pair.partition("=")
        if eq and value and _secret_param(name):
            found.append(value)
    out = []
    for value in found:
        for v in (value, unquote(value), unquote_plus(value)):
            if v and v not in out:
                out.append(v)
    return out


def _split_authority(rest: str) -> tuple[str, str, str]:
    """``user:pw@host:port`` and the path/query/fragment after it. The authority ends at / ? or # after
    its last ``@``: an unencoded ``#`` or ``?`` in a password must not hide the password."""
    slash = rest.find("/")
    at = rest.rfind("@", 0, slash if slash >= 0 else len(rest))
    m = re.compile(r"[/?#]").search(rest, at + 1)
    return (rest, "", "") if m is None else (rest[: m.start()], rest[m.start()], rest[m.start() :])


def redact_url(url: str) -> str:
    """The URL as it may be shown in a log line or an error: any password (``user:pw@`` or a secret query
    parameter such as ``?password=``, ``?token=``) replaced by ``***``. Never raises, whatever the text."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, _, tail = _split_authority(rest)
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.partition(':')[0]}:{REDACTED}@{host}"
    if (m := re.search(r"[?#]", tail)) is not None:
        tail = tail[: m.end()] + _redact_pairs(tail[m.end() :])
    return f"{scheme}://{authority}{tail}"


def _redact_pairs(query: str) -> str:
    """``a=1&password=x#token=y`` with the secret values replaced (a fragment may carry a token too)."""
    out = []
    for pair in re.split(r"([&;#])", query):
        name, eq, value = pair.partition("=")
        out.append(f"{name}={REDACTED}" if eq and value and _secret_param(name) else pair)
    return "".join(out)


def redact_text(text: str, *urls: str) -> str:
    """``text`` (an error message, a log line) with every URL in it redacted, and every secret of ``urls``
    removed wherever it appears (a driver may quote the password without the URL around it)."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    for url in urls:
        for secret in sorted(url_secrets(url), key=len, reverse=True):
            text = text.replace(secret, REDACTED)
    return text
