"""Readable log lines on stderr."""

from __future__ import annotations

import logging
import sys


def setup(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("amqtt", "pymodbus", "transitions", "asyncio", "gmqtt", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)
