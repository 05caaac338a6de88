"""Readable log lines on stderr, never with a secret in them.

Every line passes through ``redact``: URLs lose their passwords and secret query
parameters, and values registered with ``hide`` (tokens read from files) are
masked wherever they appear, traceback text included. The places that log or
raise with a URL redact it themselves (``netutil.redact_url``); this is the net
under them.
"""

from __future__ import annotations

import logging
import re
import sys

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


def setup(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("amqtt", "pymodbus", "transitions", "asyncio", "gmqtt", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)
