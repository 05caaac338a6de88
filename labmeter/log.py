"""Readable log lines on stderr, stamped in local time with the UTC offset, never with a secret in them.

Every line passes through ``redact``: URLs lose their passwords and secret query
parameters, and values registered with ``hide`` (tokens read from files) are
masked wherever they appear, traceback text included. The places that log or
raise with a URL redact it themselves (``netutil.redact_url``); this is the net
under them.

Third-party libraries (pymodbus, gmqtt, amqtt, aiohttp, ...) log every failed request, often with a hex
dump; a meter that stops answering would fill the journal with them. By default each distinct library
message is shown once per ``REPEAT_S``, first line only: labmeter's own lines say what failed and when it
works again. ``--verbose`` shows everything.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import unicodedata

from labmeter.netutil import REDACTED, redact_text

_hidden: set[str] = set()
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """Text from the data (names, units, states) for a terminal: control characters, escape sequences
    included, become nothing, so hostile data cannot move the cursor, recolour or retitle a terminal."""
    return _CONTROL.sub("", str(value))


def hide(secret: str | None) -> None:
    """Never show ``secret`` (a token, a password read from a file) in a log line of this process."""
    if secret:
        _hidden.add(secret)


def redact(text: str) -> str:
    text = redact_text(text)
    for secret in sorted(_hidden, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


NOISY = ("amqtt", "pymodbus", "transitions", "asyncio", "gmqtt", "aiohttp", "serial", "passlib")
GMQTT = "labmeter.mqtt.gmqtt"  # gmqtt's own messages, under the logger labmeter.mqtt gives it
REPEAT_S = 600.0
MAX_KEYS = 256  # a bound on what the filter remembers, whatever the libraries log
DATEFMT = "%Y-%m-%d %H:%M:%S%z"


class LibraryEpisodes(logging.Filter):
    """Pass a third-party message once per ``REPEAT_S`` (per logger and message), cut to its first line."""

    def __init__(self, repeat_s: float = REPEAT_S) -> None:
        super().__init__()
        self.repeat_s = repeat_s
        self._seen: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name.split(".", 1)[0] not in NOISY and name != GMQTT and not name.startswith(GMQTT + "."):
            return True
        first = str(record.msg).split("\n", 1)[0][:200]
        key = (record.name, first)
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last < self.repeat_s:
            return False
        if len(self._seen) >= MAX_KEYS:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.repeat_s}
            if len(self._seen) >= MAX_KEYS:
                self._seen.clear()
        self._seen[key] = now
        try:
            text = record.getMessage().split("\n", 1)[0][:300]
        except Exception:  # a library's bad format string must not break logging
            text = first
        record.msg = f"{text} (shown once per {self.repeat_s / 60:g} min; --verbose shows every one)"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def formatter() -> logging.Formatter:
    return RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", DATEFMT)


def setup(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    if not verbose:
        handler.addFilter(LibraryEpisodes())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in NOISY:
        # quiet commands (probe, calibrate) print their own diagnosis of what failed
        lib_level = logging.DEBUG if verbose else logging.CRITICAL if quiet else logging.ERROR
        logging.getLogger(noisy).setLevel(lib_level)
    if verbose:
        logging.getLogger(GMQTT).setLevel(logging.DEBUG)


# display width: terminal columns, the same for `top`, report tables and spreadsheet column widths
ELLIPSIS = "…"


def cell_width(ch: str) -> int:
    """Columns a character takes in a terminal: wide and fullwidth (CJK) 2, combining marks 0."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    return sum(cell_width(ch) for ch in text)


def fit(text: str, width: int, right: bool = False) -> str:
    """``text`` padded to exactly ``width`` columns, cut with an ellipsis when it is wider."""
    if width <= 0:
        return ""
    if text_width(text) > width:
        out, used = [], 0
        for ch in text:
            w = cell_width(ch)
            if used + w > width - 1:
                break
            out.append(ch)
            used += w
        text = "".join(out) + ELLIPSIS
    pad = " " * (width - text_width(text))
    return pad + text if right else text + pad
