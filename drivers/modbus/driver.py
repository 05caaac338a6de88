"""Modbus TCP / RTU power meters (pymodbus async client).

A failed, short or garbled read is an error sample (the classifier makes it
UNKNOWN); the client reconnects with backoff on the next reads.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import parse_qs, urlparse

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from labmeter import winsys
from labmeter.drivers.base import Cause, DriverBase, Sample, Verification, sane_energy, sane_power
from labmeter.drivers.modbus import (
    DATA_TYPES,
    ORDER_WORDS,
    PLAUSIBLE,
    CheckRegister,
    EnergyRegister,
    ModbusProfile,
    ModbusSource,
    Refusal,
    Register,
    Words,
    decode,
    exception_name,
    other_order,
    power_problem,
    rtu_port,
)
from labmeter.wire import State

log = logging.getLogger("labmeter.drivers.modbus")

READS = {1: "read_coils", 2: "read_discrete_inputs", 3: "read_holding_registers", 4: "read_input_registers"}


class ModbusDriver(DriverBase):
    def __init__(
        self,
        source: ModbusSource,
        register: Register | ModbusProfile,
        checks: dict[str, CheckRegister] | None = None,
        energy: EnergyRegister | None = None,
    ) -> None:
        self.source = source
        if isinstance(register, ModbusProfile):
            self.register, self.checks = register.power, register.checks()
            energy = energy or register.energy
        else:
            self.register, self.checks = register, checks or {}
        self.energy = energy
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

    async def _request(self, function: int, address: int, count: int) -> Sample | list[int] | list[bool]:
        """One read request: the registers (or bits), else an error sample saying why."""
        if not self.client.connected and not await self._connect():
            return Sample(error=f"{self.where}: cannot connect", cause=Cause.CONNECT)
        dev = self.source.device_id
        try:
            rr = await getattr(self.client, READS[function])(address, count=count, device_id=dev)
        except (ModbusException, OSError) as exc:
            self.client.close()
            log.debug("%s: device %s: %s", self.where, dev, exc)
            return Sample(
                error=f"{self.where}: no reply from device {dev} in {self.source.timeout_s:g} s",
                cause=Cause.NO_REPLY,
            )
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            return Sample(
                error=f"{self.where}: device {dev} answered exception {code} ({exception_name(code)})",
                raw=Refusal(code, function, address),
                cause=Cause.REJECTED,
            )
        if function in (1, 2):
            bits = list(rr.bits)
            if not bits:
                return Sample(error=f"{self.where}: short response (no input bits)", cause=Cause.NO_REPLY)
            return bits
        regs = list(rr.registers)
        if len(regs) < count:
            return Sample(
                error=f"{self.where}: short response ({len(regs)} of {count} registers)",
                raw=Words(tuple(regs)),
                cause=Cause.NO_REPLY,
            )
        return regs[:count]

    async def read(self) -> Sample:
        reg = self.register
        got = await self._request(reg.function, reg.address, DATA_TYPES[reg.type][1])
        if isinstance(got, Sample):
            return got
        if reg.type == "bit":
            on = bool(got[0])
            return Sample(status=State(reg.on_state if on else reg.off_state), raw=on)
        words = Words(tuple(int(w) for w in got))
        value = decode(words.values, reg.type, reg.word_order)
        if problem := power_problem(value, reg.scale, reg.type):
            return Sample(
                error=f"{self.where}: {problem}",
                raw=words,
                cause=Cause.ABSURD,
            )
        sample = sane_power(value * reg.scale, self.where)
        if sample.power_w is None:
            return sample
        return Sample(power_w=sample.power_w, raw=words, energy_wh=await self._read_energy())

    async def _read_energy(self) -> float | None:
        """The energy counter in Wh, or None: its failure never fails the power reading. A meter that
        refuses the register (no such address) is not asked again until the agent restarts."""
        en = self.energy
        if en is None:
            return None
        got = await self._request(en.function, en.address, DATA_TYPES[en.type][1])
        if isinstance(got, Sample):
            if got.cause is Cause.REJECTED:
                log.warning(
                    "%s: energy register refused (%s): energy is integrated from power", self.where, got.error
                )
                self.energy = None
            return None
        return sane_energy(decode([int(w) for w in got], en.type, self.register.word_order) * en.scale)

    async def verify(self) -> Verification:
        """Which word order the meter uses, from its check registers (mains voltage and frequency read in
        both orders), else from whether the power itself is believable in each order."""
        reg = self.register
        if reg.type == "bit":
            return Verification()
        order, other = reg.word_order, other_order(reg.word_order)
        lines: list[str] = []
        fits: dict[str, list[str]] = {order: [], other: []}  # the checks each order passes
        both: list[str] = []  # checks that cannot tell the orders apart
        for name, creg in self.checks.items():
            lo, hi, unit = PLAUSIBLE[name]
            n = DATA_TYPES[creg.type][1]
            got = await self._request(creg.function, creg.address, n)
            where = f"{name} (function {creg.function}, 0x{creg.address:04X})"
            if isinstance(got, Sample):
                return Verification(
                    tuple(lines),
                    problem=f"the {where} cannot be read ({got.error}): this meter does not match profile "
                    f"{self.source.profile!r}; if its model has no such register, copy the profile into "
                    f"your profiles_dir without [{name}]",
                )
            words = [int(w) for w in got]
            mine = decode(words, creg.type, order) * creg.scale
            theirs = decode(words, creg.type, other) * creg.scale if n == 2 else mine
            ok_mine, ok_theirs = lo <= mine <= hi, lo <= theirs <= hi
            lines.append(
                f"{where}: raw {Words(tuple(words))!r} -> {mine:.6g} {unit}"
                + (f" ({ORDER_WORDS[other]}: {theirs:.6g} {unit})" if n == 2 else "")
            )
            if ok_mine and ok_theirs:
                both.append(name)
            elif ok_mine or ok_theirs:
                fits[order if ok_mine else other].append(name)
            else:
                return Verification(
                    tuple(lines),
                    problem=f"the meter's {name} reads {mine:.6g} {unit}"
                    + (f" ({theirs:.6g} {unit} in the other word order)" if n == 2 else "")
                    + f", not mains ({lo:g}-{hi:g} {unit}): the register, data type or scale of profile "
                    f"{self.source.profile!r} does not match this meter",
                )
        power = await self._request(reg.function, reg.address, DATA_TYPES[reg.type][1])
        if isinstance(power, Sample):
            return Verification(tuple(lines), problem=power.error)
        pw = [int(w) for w in power]
        p_mine, p_theirs = (decode(pw, reg.type, o) for o in (order, other))
        two = DATA_TYPES[reg.type][1] == 2
        if two:
            lines.append(
                f"power: raw {Words(tuple(pw))!r} -> {p_mine * reg.scale:.6g} W as configured "
                f"({ORDER_WORDS[order]}), {p_theirs * reg.scale:.6g} W {ORDER_WORDS[other]}"
            )
        set_other = (
            f'set word_order = "{other}" under [power] (a site profile in profiles_dir, or the '
            "[instrument.source.register] table)"
        )
        if fits[other] and fits[order]:
            return Verification(
                tuple(lines),
                problem=f"the check registers disagree on the word order ({', '.join(fits[order])} fit "
                f"{ORDER_WORDS[order]}, {', '.join(fits[other])} fit {ORDER_WORDS[other]}): profile "
                f"{self.source.profile!r} does not match this meter",
            )
        if fits[other]:
            return Verification(
                tuple(lines),
                problem=f"the meter sends its words {ORDER_WORDS[other]} but profile "
                f"{self.source.profile!r} reads them {ORDER_WORDS[order]}: its {' and '.join(fits[other])} "
                f"make sense only that way, so every power read is wrong: {set_other}",
            )
        mine_bad = power_problem(p_mine, reg.scale, reg.type)
        if fits[order]:
            lines.append(f"word order: {ORDER_WORDS[order]}, confirmed by the {' and '.join(fits[order])}")
            if mine_bad:
                return Verification(
                    tuple(lines),
                    problem=f"the power register reads {mine_bad}: its address, data type or scale in "
                    f"profile {self.source.profile!r} does not match this meter",
                )
            return Verification(tuple(lines))
        if not two:
            return Verification(tuple(lines))
        theirs_bad = power_problem(p_theirs, reg.scale, reg.type)
        if mine_bad and not theirs_bad:
            return Verification(
                tuple(lines),
                problem=f"the power reads {mine_bad} as configured but {p_theirs * reg.scale:.6g} W "
                f"{ORDER_WORDS[other]}: the meter sends its words {ORDER_WORDS[other]}: {set_other}",
            )
        if mine_bad:
            return Verification(
                tuple(lines),
                problem=f"the power reads {mine_bad} in either word order: wrong register or data type",
            )
        if theirs_bad:
            lines.append(
                f"word order: {ORDER_WORDS[order]} (the other order would read {p_theirs * reg.scale:.6g} W, "
                "which no meter does)"
            )
            return Verification(tuple(lines))
        checked = f" ({', '.join(both)} fit both)" if both else ""
        return Verification(
            tuple(lines),
            unsure=f"both word orders give a believable power ({p_mine * reg.scale:g} W / "
            f"{p_theirs * reg.scale:g} W) and nothing else tells them apart{checked}: compare with the "
            "meter's display while the instrument draws power, or name a [voltage] register in a site profile",
        )

    async def close(self) -> None:
        self.client.close()
