"""Modbus register words, written independently of the driver and the simulator."""

from __future__ import annotations

import struct


def words(value: float, order: str = "big") -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo] if order == "big" else [lo, hi]


class SilentServer:
    """A TCP port that accepts connections and reads requests but never answers: a Modbus TCP meter
    (or gateway) that does not reply, as far as the client can tell."""

    def __init__(self, port: int) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", port))
        self.conns: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import contextlib
        import threading

        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

            def drain(c=conn) -> None:  # type: ignore[no-untyped-def]
                with contextlib.suppress(OSError):
                    while c.recv(256):
                        pass

            threading.Thread(target=drain, daemon=True).start()

    def stop(self) -> None:
        self.stopping = True
        self.sock.close()
        for c in self.conns:
            c.close()
