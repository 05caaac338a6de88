"""Modbus register words, written independently of the driver and the simulator."""

from __future__ import annotations

import struct


def words(value: float, order: str = "big") -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo] if order == "big" else [lo, hi]
