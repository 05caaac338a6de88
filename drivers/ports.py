"""What can be said about a serial port before opening it (Modbus RTU and serial instruments)."""

from __future__ import annotations

import os
from collections.abc import Callable

from labmeter import winsys

DEVICE_MANAGER = (
    "Device Manager (devmgmt.msc) > Ports (COM & LPT) lists the adapters and their COM numbers; "
    "a USB adapter re-plugged into another socket may get another number"
)


def port_problem(path: str) -> str | None:
    if "://" in path:
        return None
    if winsys.WINDOWS:
        return windows_port_problem(path, os.path.exists)
    if not os.path.exists(path):
        hint = " (USB adapters: prefer /dev/serial/by-id/... so a re-plug cannot change the name)"
        return f"serial port {path} does not exist: is the adapter plugged in?{hint}"
    if not os.access(path, os.R_OK | os.W_OK):
        return (
            f"no permission on {path}: add the agent's user to the dialout group "
            "(sudo usermod -aG dialout $USER) and log in again"
        )
    return None


def windows_port_problem(port: str, exists: Callable[[str], bool]) -> str | None:
    """A COM port is looked up as ``\\\\.\\COMn`` (``exists`` is os.path.exists, a parameter for the tests)."""
    name = winsys.com_name(port)
    if name is None:
        return f"serial port {port!r} is not a Windows port name: use COM1 ... COM256 (see {DEVICE_MANAGER})"
    if not exists(winsys.com_device(name)):
        return (
            f"serial port {name} does not exist: is the adapter plugged in and its driver installed? "
            + DEVICE_MANAGER
        )
    return None
