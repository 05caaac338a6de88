"""Modbus TCP / RTU power meters (pymodbus async client).

A failed, short or garbled read is an error sample (the classifier makes it
UNKNOWN); the client reconnects with backoff on the next reads.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import parse_qs, urlparse

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.exceptions import ModbusException

from labmeter import winsys
from labmeter.drivers.base import Cause, DriverBase, Sample, sane_power
from labmeter.drivers.modbus import DATA_TYPES, ModbusProfile, ModbusSource, Register, rtu_port
from labmeter.wire import State

log = logging.getLogger("labmeter.drivers.modbus")

_TYPES = {
    "float32": ModbusClientMixin.DATATYPE.FLOAT32,
    "int16": ModbusClientMixin.DATATYPE.INT16,
    "uint16": ModbusClientMixin.DATATYPE.UINT16,
    "int32": ModbusClientMixin.DATATYPE.INT32,
    "uint32": ModbusClientMixin.DATATYPE.UINT32,
}
READS = {1: "read_coils", 2: "read_discrete_inputs", 3: "read_holding_registers", 4: "read_input_registers"}


class ModbusDriver(DriverBase):
    def __init__(self, source: ModbusSource, register: Register | ModbusProfile) -> None:
        self.source = source
        self.register = register.power if isinstance(register, ModbusProfile) else register
        self.where = source.url
        url = urlparse(source.url)
        client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if url.scheme == "tcp":
            client = AsyncModbusTcpClient(
                url.hostname or "127.0.0.1",
                port=url.port or 502,
                timeout=source.timeout_s,
                retries=0,
                reconnect_delay=0,
            )
        else:
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            client = AsyncModbusSerialClient(
                winsys.serial_device(rtu_port(source.url)),
                baudrate=int(q.get("baud", 9600)),
                parity=q.get("parity", "N"),
                stopbits=int(q.get("stop", 1)),
                bytesize=int(q.get("bits", 8)),
                timeout=source.timeout_s,
                retries=0,
                reconnect_delay=0,
            )
        self.client = client
        self._backoff = 0.5
        self._next_try = 0.0

    async def start(self) -> None:
        await self._connect()

    async def _connect(self) -> bool:
        """Connect, backing off (0.5 s doubling to 30 s) while the device stays unreachable."""
        now = time.monotonic()
        if now < self._next_try:
            return False
        try:
            ok = bool(await self.client.connect())
        except (OSError, ModbusException) as exc:
            log.debug("%s: connect failed: %s", self.where, exc)
            ok = False
        if ok:
            self._backoff = 0.5
        else:
            self._next_try = now + self._backoff
            self._backoff = min(self._backoff * 2, 30.0)
        return ok

    async def read(self) -> Sample:
        reg = self.register
        if not self.client.connected and not await self._connect():
            return Sample(error=f"{self.where}: cannot connect", cause=Cause.CONNECT)
        words = DATA_TYPES[reg.type][1]
        dev = self.source.device_id
        try:
            rr = await getattr(self.client, READS[reg.function])(reg.address, count=words, device_id=dev)
        except (ModbusException, OSError) as exc:
            self.client.close()
            return Sample(error=f"{self.where}: {type(exc).__name__}: {exc}", cause=Cause.NO_REPLY)
        if rr.isError():
            return Sample(
                error=f"{self.where}: device {dev} answered {rr}", raw=str(rr), cause=Cause.REJECTED
            )
        if reg.type == "bit":
            if not rr.bits:
                return Sample(error=f"{self.where}: short response (no input bits)", cause=Cause.NO_REPLY)
            on = bool(rr.bits[0])
            return Sample(status=State(reg.on_state if on else reg.off_state), raw=on)
        regs = list(rr.registers)
        if len(regs) < words:
            return Sample(
                error=f"{self.where}: short response ({len(regs)} of {words} registers)",
                raw=regs,
                cause=Cause.NO_REPLY,
            )
        value = self.client.convert_from_registers(regs[:words], _TYPES[reg.type], word_order=reg.word_order)
        assert isinstance(value, int | float)
        return sane_power(float(value) * reg.scale, self.where)

    async def close(self) -> None:
        self.client.close()
