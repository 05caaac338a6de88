"""The Windows branches that run on Linux too: COM port names, ACL commands, path defaults, the lean install.

The real thing (Windows CPython under Wine, COM ports, the service) is tests/test_windows_wine.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from labmeter import cli, config, signing, winsys
from labmeter.cli import common
from labmeter.drivers import ports
from labmeter.drivers.modbus import ModbusSource, rtu_port
from labmeter.drivers.registry import agent_config
from labmeter.drivers.serial.driver import resolve_port

AGENT = """
[agent]
id = "win-01"
{paths}
[[instrument]]
id = "M1"
[instrument.source]
driver = "modbus"
url = "tcp://127.0.0.1:502"
profile = "eastron-sdm120"
[instrument.states]
off_below_w = 5
run_above_w = 400
"""


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(winsys, "WINDOWS", True)
    monkeypatch.setenv("PROGRAMDATA", "D:\\Data")


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("COM12", "COM12"),
        ("com3", "COM3"),
        ("/COM13", "COM13"),  # rtu:///COM13
        ("\\\\.\\COM200", "COM200"),
        ("COM0", None),
        ("COM1000", None),
        ("/dev/ttyUSB0", None),
        ("COM12x", None),
        ("LPT1", None),
    ],
)
def test_com_port_names(text: str, name: str | None) -> None:
    assert winsys.com_name(text) == name


def test_com_ports_open_by_their_device_name_on_windows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_port("COM12") == "COM12"  # Linux: a name is a path like any other
    assert resolve_port("/dev/ttyUSB0") == "/dev/ttyUSB0"
    monkeypatch.setattr(winsys, "WINDOWS", True)
    assert resolve_port("COM12") == "\\\\.\\COM12"  # COM10 and above open only this way
    assert resolve_port("com3") == "\\\\.\\COM3"
    assert resolve_port("loop://") == "loop://"


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("rtu://COM12?baud=9600", "COM12"),
        ("rtu://com12/?baud=19200&parity=E", "COM12"),
        ("rtu:///COM13", "COM13"),
        ("rtu:///dev/ttyUSB0?baud=9600", "/dev/ttyUSB0"),
        ("rtu:///dev/serial/by-id/usb-FTDI_X-if00-port0", "/dev/serial/by-id/usb-FTDI_X-if00-port0"),
    ],
)
def test_modbus_rtu_urls(url: str, port: str) -> None:
    src = ModbusSource(url=url, profile="eastron-sdm120")
    assert rtu_port(src.url) == port


@pytest.mark.parametrize("url", ["rtu://ttyUSB0", "rtu://dev/ttyUSB0", "rtu://COM", "rtu:COM12", "udp://x:1"])
def test_modbus_urls_refused(url: str) -> None:
    with pytest.raises(ValueError, match="url must be"):
        ModbusSource(url=url, profile="eastron-sdm120")


def test_windows_port_check_uses_the_device_name_and_hints_device_manager() -> None:
    seen: list[str] = []

    def exists(path: str) -> bool:
        seen.append(path)
        return path == "\\\\.\\COM12"

    assert ports.windows_port_problem("COM12", exists) is None
    assert seen == ["\\\\.\\COM12"]
    missing = ports.windows_port_problem("/COM13", exists)
    assert missing is not None and "COM13 does not exist" in missing and "Device Manager" in missing
    assert "dialout" not in missing and "usermod" not in missing
    bad = ports.windows_port_problem("/dev/ttyUSB0", exists)
    assert bad is not None and "not a Windows port name" in bad


def test_icacls_command_grants_only_system_administrators_and_the_account() -> None:
    path = Path("C:/ProgramData/lab meter/agent.key")
    args = winsys.icacls_args(path, "S-1-5-21-1-2-3-1001", ["S-1-1-0", "S-1-5-32-545"])
    assert args[:4] == ["icacls", str(path), "/inheritance:r", "/grant:r"]
    assert args[4:7] == ["*S-1-5-18:(F)", "*S-1-5-32-544:(F)", "*S-1-5-21-1-2-3-1001:(F)"]
    assert args[7:] == ["/remove:g", "*S-1-1-0", "*S-1-5-32-545"]
    command = winsys.icacls_command(path, "S-1-5-21-1-2-3-1001", ["S-1-1-0"])
    assert command.startswith(f'icacls "{path}" /inheritance:r')  # a path with a space is quoted for cmd.exe
    # the service account SYSTEM is not granted twice; a name (no SID) is passed as it is
    assert winsys.icacls_grants(winsys.SYSTEM_SID) == ["*S-1-5-18:(F)", "*S-1-5-32-544:(F)"]
    assert winsys.icacls_grants("LAB\\svc-labmeter")[-1] == "LAB\\svc-labmeter:(F)"


def test_readers_among_an_acl() -> None:
    allowed = {winsys.SYSTEM_SID, winsys.ADMINISTRATORS_SID, "S-1-5-21-9"}
    aces = [
        (0, 0x1F01FF, winsys.SYSTEM_SID),
        (0, 0x1F01FF, "S-1-5-21-9"),
        (0, 0x1200A9, "S-1-1-0"),  # Everyone: read and execute (what Wine and inherited ACLs give)
        (0, 0x100000, "S-1-5-32-545"),  # Users: SYNCHRONIZE only, cannot read
        (1, 0x1F01FF, "S-1-5-11"),  # a deny entry is no reader
        (0, 0x80000000, "S-1-5-11"),  # GENERIC_READ
        (0, 0x1200A9, "S-1-1-0"),
    ]
    assert winsys.readers_among(aces, allowed) == ["S-1-1-0", "S-1-5-11"]
    assert [winsys.sid_label(s) for s in ["S-1-1-0", "S-1-5-11", "S-1-5-21-7"]] == [
        "Everyone",
        "Authenticated Users",
        "S-1-5-21-7",
    ]
    assert winsys.readers_among(aces[:2], allowed) == []


def test_service_command_line_stores_the_config_path() -> None:
    line = winsys.service_command("C:\\Program Files\\Python313\\python.exe", "C:\\lab meter\\agent.toml")
    assert line == (
        '"C:\\Program Files\\Python313\\python.exe" -m labmeter agent service --config "C:\\lab meter\\agent.toml"'
    )
    assert winsys.failure_args()[:3] == ["sc", "failure", "labmeter-agent"]
    assert "restart/" in winsys.failure_args()[-1]


@pytest.mark.parametrize(
    ("path", "posix"),
    [("/var/lib/labmeter", True), ("\\state", True), ("C:\\ProgramData\\labmeter", False), ("state", False)],
)
def test_posix_rooted(path: str, posix: bool) -> None:
    assert winsys.posix_rooted(path) is posix


def test_windows_defaults_are_in_programdata(windows: None) -> None:
    cfg = config.parse(AGENT.format(paths=""), agent_config())
    assert str(cfg.agent.state_dir).replace("/", "\\") == "D:\\Data\\labmeter"
    assert str(cfg.agent.key_file).replace("/", "\\") == "D:\\Data\\labmeter\\agent.key"


def test_windows_refuses_posix_paths_with_the_key(windows: None) -> None:
    text = AGENT.format(paths='state_dir = "/var/lib/labmeter"')
    with pytest.raises(config.ConfigError) as err:
        config.parse(text, agent_config(), "C:\\lab\\agent.toml")
    message = str(err.value)
    assert message.startswith("C:\\lab\\agent.toml: agent.state_dir = '/var/lib/labmeter' is a POSIX path")
    assert "ProgramData" in message


def test_linux_still_needs_key_file_and_state_dir() -> None:
    with pytest.raises(config.ConfigError, match="key_file"):
        config.parse(AGENT.format(paths='state_dir = "/var/lib/labmeter"'), agent_config())
    with pytest.raises(config.ConfigError, match="state_dir"):
        config.parse(AGENT.format(paths='key_file = "/k"'), agent_config())
    cfg = config.parse(AGENT.format(paths='key_file = "/k"\nstate_dir = "/var/lib/labmeter"'), agent_config())
    assert cfg.agent.state_dir == Path("/var/lib/labmeter")  # POSIX paths are fine off Windows


def test_windows_example_config_loads(windows: None) -> None:
    example = Path(__file__).parent.parent / "config" / "agent.windows.example.toml"
    cfg = config.parse(example.read_text(encoding="utf-8"), agent_config(), str(example))
    urls = [getattr(i.source, "url", "") for i in cfg.instrument]
    assert any(winsys.com_name(u) for u in urls)  # a serial instrument on a COM port
    assert any(u.startswith("rtu://COM") for u in urls)
    assert cfg.agent.key_file == winsys.program_data() / "agent.key"  # not set: the default


@pytest.mark.parametrize("ending", ["\r\n", "\r", "\n", "  \t"])
def test_public_key_pasted_from_a_windows_console(ending: str) -> None:
    key = signing.PrivateKey.generate().public_key()
    text = signing.public_key_text(key)
    assert bytes(signing.parse_public_key(text + ending)) == bytes(key)
    assert bytes(signing.parse_public_key(ending + text + ending)) == bytes(key)


def test_enroll_says_mode_0600_only_off_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(AGENT.format(paths='key_file = "agent.key"\nstate_dir = "state"'), encoding="utf-8")
    out = CliRunner().invoke(cli.app, ["agent", "enroll", "--config", str(cfg)])
    assert out.exit_code == 0, out.output
    assert "(mode 0600)" in out.output
    monkeypatch.setattr(winsys, "WINDOWS", True)
    monkeypatch.setattr(winsys, "protect", lambda path: None)  # the ACL itself needs Windows (the Wine test)
    out = CliRunner().invoke(cli.app, ["agent", "enroll", "--config", str(cfg), "--force"])
    assert out.exit_code == 0, out.output
    assert "mode 0600" not in out.output, out.output
    assert "SYSTEM, Administrators and you only" in out.output


def test_enroll_on_windows_sets_the_acl_before_the_secret_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    monkeypatch.setattr(winsys, "WINDOWS", True)
    monkeypatch.setattr(winsys, "protect", lambda path: sizes.append(path.stat().st_size))
    signing.generate_key_file(tmp_path / "agent.key")
    assert sizes == [0]

    def refuse(path: Path) -> None:
        raise OSError(f"{path}: cannot set its access list (denied)")

    monkeypatch.setattr(winsys, "protect", refuse)
    with pytest.raises(signing.KeyFileError, match="cannot set its access list"):
        signing.generate_key_file(tmp_path / "other.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.key"]  # no key, no temporary file left


def test_a_key_others_can_read_is_refused_on_windows_with_the_icacls_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.key"
    signing.generate_key_file(path)
    monkeypatch.setattr(winsys, "WINDOWS", True)
    fix = winsys.icacls_command(path, "S-1-5-21-9", ["S-1-1-0"])
    monkeypatch.setattr(winsys, "readable_by", lambda p: (["Everyone"], fix))
    with pytest.raises(signing.KeyFileError) as err:
        signing.load_private_key(path)
    assert "readable by Everyone" in str(err.value) and fix in str(err.value)
    monkeypatch.setattr(winsys, "readable_by", lambda p: None)
    signing.load_private_key(path)


def test_collector_commands_name_the_extra_when_its_libraries_are_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "aiohttp" else real(name))
    for args in (["collector", "run"], ["report", "hours"], ["broker"], ["demo"]):
        out = CliRunner().invoke(cli.app, args)
        assert out.exit_code == 2, (args, out.output)
        assert "pip install 'labmeter[collector]'" in out.output and "aiohttp" in out.output


def test_the_agent_imports_none_of_the_collector_libraries() -> None:
    code = (
        "import sys, labmeter.cli, labmeter.agent.runtime, labmeter.drivers.registry as r\n"
        "for p in r.DRIVERS.values(): p.build.__module__\n"
        "import labmeter.drivers.modbus.driver, labmeter.drivers.serial.driver, labmeter.drivers.mqtt.driver\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {common.COLLECTOR_DEPS!r}))\n"
    )
    out = subprocess.run(
        [__import__("sys").executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_console_stop_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C, Ctrl-Break, close and shutdown stop the agent; log-off does not (a fake win32api)."""
    import sys
    import threading
    import types

    handlers: list[object] = []
    fake = types.ModuleType("win32api")
    fake.SetConsoleCtrlHandler = lambda h, add: handlers.append(h)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "win32api", fake)
    stops: list[int] = []
    done = threading.Event()
    done.set()
    winsys.on_console_stop(lambda: stops.append(1), done)
    (handler,) = handlers
    assert callable(handler)
    for event in (winsys.CTRL_C, winsys.CTRL_BREAK, winsys.CTRL_CLOSE, winsys.CTRL_SHUTDOWN):
        assert handler(event) is True  # handled: the C runtime's SIGINT path does not run as well
    assert len(stops) == 4
    assert handler(winsys.CTRL_LOGOFF) is True and len(stops) == 4


def test_windows_event_loop_is_the_selector_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    assert winsys.loop_factory() is None
    monkeypatch.setattr(winsys, "WINDOWS", True)
    assert winsys.loop_factory() is asyncio.SelectorEventLoop


def test_service_entry_point_is_refused_off_windows() -> None:
    out = CliRunner().invoke(cli.app, ["agent", "service"])
    assert out.exit_code == 2 and "Windows service's entry point" in out.output


def test_usb_serial_finds_the_adapter_in_the_windows_port_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """The port list names COM12; pyserial must open it as \\\\.\\COM12 (COM10 and above open no other way).
    The Windows port list itself is mocked: under Wine 8 `list_ports` fails (docs/windows.md)."""
    from types import SimpleNamespace

    from serial.tools import list_ports

    adapters = [
        SimpleNamespace(serial_number="A10K5XYZ", device="COM12"),
        SimpleNamespace(serial_number="B", device="COM3"),
    ]
    monkeypatch.setattr(list_ports, "comports", lambda: adapters)
    monkeypatch.setattr(winsys, "WINDOWS", True)
    assert resolve_port("usb-serial://A10K5XYZ") == "\\\\.\\COM12"
    monkeypatch.setattr(winsys, "WINDOWS", False)
    assert resolve_port("usb-serial://A10K5XYZ") == "COM12"
