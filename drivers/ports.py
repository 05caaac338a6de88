"""What can be said about a serial port before opening it (Modbus RTU and serial instruments)."""

from __future__ import annotations

import os


def port_problem(path: str) -> str | None:
    if "://" in path:
        return None
    if not os.path.exists(path):
        hint = " (USB adapters: prefer /dev/serial/by-id/... so a re-plug cannot change the name)"
        return f"serial port {path} does not exist: is the adapter plugged in?{hint}"
    if not os.access(path, os.R_OK | os.W_OK):
        return (
            f"no permission on {path}: add the agent's user to the dialout group "
            "(sudo usermod -aG dialout $USER) and log in again"
        )
    return None
