"""Local ports for the demo, the simulators, the tests and the benchmarks."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
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
