"""The agent as a Windows service: pywin32's ServiceFramework, hosted by python.exe itself.

No separate service wrapper (pythonservice.exe, NSSM): the SCM starts ``python.exe -m labmeter agent
service --config PATH``, whose stop and shutdown controls set the same stop event Ctrl-C sets in a
console, so intervals are closed and the outbox flushed exactly as on Linux. Windows only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import logging.handlers
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pywintypes
import servicemanager
import win32service
import win32serviceutil

from labmeter import config, log, signing, winsys

NAME = winsys.SERVICE_NAME
LOG_BYTES = 5_000_000
LOG_BACKUPS = 4
STOP_WAIT_S = 30.0


class ServiceError(Exception):
    """Worded for the user."""


def _not_elevated() -> ServiceError:
    return ServiceError(
        "installing or removing a service needs an elevated prompt: right-click Command Prompt or "
        "PowerShell, 'Run as administrator', and run the command again"
    )


def _scm(access: int) -> Any:
    try:
        return win32service.OpenSCManager(None, None, access)
    except pywintypes.error as exc:
        if exc.winerror == 5:
            raise _not_elevated() from None
        raise ServiceError(f"cannot open the service control manager: {exc.strerror}") from None


def install(command: str, start: bool = True) -> None:
    """Create (or update) the service: automatic start, restart on failure, event source, then start it."""
    with contextlib.suppress(AttributeError, OSError):
        if not ctypes.windll.shell32.IsUserAnAdmin():  # type: ignore[attr-defined]
            raise _not_elevated()
    scm = _scm(win32service.SC_MANAGER_ALL_ACCESS)
    try:
        try:
            svc = win32service.OpenService(scm, NAME, win32service.SERVICE_ALL_ACCESS)
            win32service.ChangeServiceConfig(
                svc,
                win32service.SERVICE_WIN32_OWN_PROCESS,
                win32service.SERVICE_AUTO_START,
                win32service.SERVICE_ERROR_NORMAL,
                command,
                None,
                0,
                None,
                None,
                None,
                "labmeter agent",
            )
        except pywintypes.error as exc:
            if exc.winerror != 1060:  # ERROR_SERVICE_DOES_NOT_EXIST
                raise ServiceError(f"cannot update service {NAME}: {exc.strerror}") from None
            try:
                svc = win32service.CreateService(
                    scm,
                    NAME,
                    "labmeter agent",
                    win32service.SERVICE_ALL_ACCESS,
                    win32service.SERVICE_WIN32_OWN_PROCESS,
                    win32service.SERVICE_AUTO_START,
                    win32service.SERVICE_ERROR_NORMAL,
                    command,
                    None,
                    0,
                    None,
                    None,
                    None,
                )
            except pywintypes.error as exc2:
                if exc2.winerror == 5:
                    raise _not_elevated() from None
                raise ServiceError(f"cannot create service {NAME}: {exc2.strerror}") from None
        with contextlib.suppress(pywintypes.error, NotImplementedError):
            win32service.ChangeServiceConfig2(
                svc,
                win32service.SERVICE_CONFIG_DESCRIPTION,
                "Meters the instruments and sends signed intervals to the labmeter collector.",
            )
        win32service.CloseServiceHandle(svc)
    finally:
        win32service.CloseServiceHandle(scm)
    failure = subprocess.run(winsys.failure_args(), capture_output=True, text=True)
    if failure.returncode != 0:
        logging.getLogger("labmeter.agent").warning(
            "could not set restart on failure (%s): %s",
            " ".join(winsys.failure_args()),
            (failure.stdout + failure.stderr).strip(),
        )
    with contextlib.suppress(Exception):
        import win32evtlogutil

        win32evtlogutil.AddSourceToRegistry(NAME, servicemanager.__file__)
    if start:
        _start()


def _start() -> None:
    try:
        win32serviceutil.StartService(NAME)
    except pywintypes.error as exc:
        if exc.winerror != 1056:  # ERROR_SERVICE_ALREADY_RUNNING
            raise ServiceError(f"cannot start service {NAME}: {exc.strerror}") from None
    _wait_for(win32service.SERVICE_RUNNING, "start")


def _wait_for(state: int, what: str) -> None:
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        if win32serviceutil.QueryServiceStatus(NAME)[1] == state:
            return
        time.sleep(0.2)
    raise ServiceError(
        f"service {NAME} did not {what} in {STOP_WAIT_S:.0f} s; see the Event Log and agent.log"
    )


def uninstall() -> None:
    """Stop the service (its agent flushes as at any stop), then delete it; key and state stay."""
    scm = _scm(win32service.SC_MANAGER_ALL_ACCESS)
    try:
        try:
            svc = win32service.OpenService(scm, NAME, win32service.SERVICE_ALL_ACCESS)
        except pywintypes.error as exc:
            if exc.winerror == 5:
                raise _not_elevated() from None
            if exc.winerror == 1060:
                raise ServiceError(f"no service {NAME} is installed") from None
            raise ServiceError(f"cannot open service {NAME}: {exc.strerror}") from None
        try:
            if win32service.QueryServiceStatus(svc)[1] != win32service.SERVICE_STOPPED:
                with contextlib.suppress(pywintypes.error):
                    win32service.ControlService(svc, win32service.SERVICE_CONTROL_STOP)
                _wait_for(win32service.SERVICE_STOPPED, "stop")
            win32service.DeleteService(svc)
        except pywintypes.error as exc:
            raise ServiceError(f"cannot remove service {NAME}: {exc.strerror}") from None
        finally:
            win32service.CloseServiceHandle(svc)
    finally:
        win32service.CloseServiceHandle(scm)
    with contextlib.suppress(Exception):
        import win32evtlogutil

        win32evtlogutil.RemoveSourceFromRegistry(NAME)


class EventLogHandler(logging.Handler):
    """Errors also go to the Windows Event Log (Application, source labmeter-agent)."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            servicemanager.LogErrorMsg(self.format(record))


def _log_to(state_dir: Path) -> None:
    """The service's log: state_dir\\agent.log, rotating, plus errors in the Event Log."""
    log.setup()
    state_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        state_dir / "agent.log", maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(log.RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    events = EventLogHandler(logging.ERROR)
    events.setFormatter(log.RedactingFormatter("%(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler, events]


class AgentService(win32serviceutil.ServiceFramework):
    _svc_name_ = NAME
    _svc_display_name_ = "labmeter agent"
    config_path = winsys.program_data() / "agent.toml"

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.stopping = threading.Event()

    def SvcStop(self) -> None:
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=int(STOP_WAIT_S * 1000))
        self.stopping.set()
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)

    SvcShutdown = SvcStop

    def SvcDoRun(self) -> None:
        from labmeter.agent.runtime import run_agent
        from labmeter.drivers.registry import agent_config

        try:
            cfg = config.load(self.config_path, agent_config())
        except config.ConfigError as exc:
            servicemanager.LogErrorMsg(f"{NAME}: {exc}")
            return
        _log_to(cfg.agent.state_dir)
        agent_log = logging.getLogger("labmeter.agent")
        servicemanager.LogInfoMsg(f"{NAME}: starting with {self.config_path}")

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            if self.stopping.is_set():
                return
            await run_agent(cfg, self.stop)

        try:
            with asyncio.Runner(loop_factory=winsys.loop_factory()) as runner:
                runner.run(main())
        except signing.KeyFileError as exc:
            agent_log.error("%s", exc)
        except Exception:
            agent_log.exception("the agent stopped on an error")
            raise
        finally:
            servicemanager.LogInfoMsg(f"{NAME}: stopped")
            for h in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    h.flush()


def host(cfg_path: Path) -> None:
    """Hand this process to the SCM as the labmeter-agent service (returns when the service stops)."""
    AgentService.config_path = cfg_path
    servicemanager.Initialize(NAME, servicemanager.__file__)
    servicemanager.PrepareToHostSingle(AgentService)
    try:
        servicemanager.StartServiceCtrlDispatcher()
    except pywintypes.error as exc:
        if exc.winerror == 1063:  # started from a console, not by the SCM
            raise SystemExit(
                f"error: this is what the {NAME} service runs; use `labmeter agent run` in a console"
            ) from None
        raise
