"""Shared pieces of the benchmarks: a throwaway Mosquitto, free ports, RSS/CPU sampling."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from labmeter.netutil import free_port, wait_port

__all__ = ["free_port", "start_mosquitto", "wait_port"]


def start_mosquitto(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_queued_bytes 0\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc
