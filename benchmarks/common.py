"""Shared pieces of the benchmarks: a throwaway Mosquitto, free ports, RSS/CPU sampling."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from labmeter.netutil import free_port, wait_port

__all__ = ["Verdicts", "free_port", "start_mosquitto", "wait_port"]


class Verdicts:
    """PASS/FAIL lines against the targets in docs/performance.md; the exit status is 1 if any failed."""

    def __init__(self) -> None:
        self.failed = 0

    def check(self, what: str, value: float, target: str, ok: bool, unit: str = "") -> None:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {value:g}{unit} (target {target})", flush=True)

    def exit(self) -> None:
        raise SystemExit(1 if self.failed else 0)


def start_mosquitto(workdir: Path, port: int, tls: bool = False) -> subprocess.Popen[bytes]:
    """A throwaway Mosquitto; with ``tls``, TLS only, with a private CA's certificate (workdir/ca.pem)."""
    conf = workdir / "mosquitto.conf"
    text = (
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_queued_bytes 0\n"
    )
    if tls:
        from tests.certs import certificates

        certificates(workdir)
        text += f"cafile {workdir / 'ca.pem'}\ncertfile {workdir / 'server.pem'}\nkeyfile {workdir / 'server.key'}\n"
        if os.geteuid() == 0:
            text += (
                "user root\n"  # else mosquitto drops to its own user, who cannot read the temporary folder
            )
    conf.write_text(text)
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc
