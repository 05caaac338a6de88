"""What differs on Windows: COM port names, ProgramData, and secrets protected by an ACL instead of 0600.

The string and list building here is pure, so the Linux suite tests it; only ``protect`` and
``readable_by`` touch the Windows security API (pywin32, with icacls as a fallback for setting).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path, PureWindowsPath
from typing import Any

WINDOWS = sys.platform == "win32"

SYSTEM_SID = "S-1-5-18"
ADMINISTRATORS_SID = "S-1-5-32-544"
WELL_KNOWN = {
    SYSTEM_SID: "SYSTEM",
    ADMINISTRATORS_SID: "Administrators",
    "S-1-1-0": "Everyone",
    "S-1-5-11": "Authenticated Users",
    "S-1-5-32-545": "Users",
}
# FILE_READ_DATA | FILE_READ_EA | FILE_READ_ATTRIBUTES... only reading the contents matters, and the generic rights
_READ_MASK = 0x0001 | 0x80000000 | 0x10000000  # FILE_READ_DATA, GENERIC_READ, GENERIC_ALL
_ACCESS_ALLOWED = 0

SERVICE_NAME = "labmeter-agent"
# restart after 5 s, 30 s, then every 60 s; the failure count resets after a day without one
FAILURE_ACTIONS = ["reset=", "86400", "actions=", "restart/5000/restart/30000/restart/60000"]

_COM = re.compile(r"^(?:\\\\\.\\|/)?(COM[1-9]\d{0,2})$", re.IGNORECASE)


def com_name(text: str) -> str | None:
    """``COM12``, ``/COM12`` (from ``rtu:///COM12``) or ``\\\\.\\COM12`` -> ``COM12``; anything else None."""
    m = _COM.match(text.strip())
    return m.group(1).upper() if m else None


def com_device(name: str) -> str:
    """The name a COM port opens by: ``\\\\.\\COM12`` (plain ``COM12`` works only up to COM9)."""
    return "\\\\.\\" + name


def serial_device(port: str) -> str:
    """The path pyserial opens for a configured port: on Windows a COM name becomes ``\\\\.\\COMn``."""
    name = com_name(port) if WINDOWS else None
    return com_device(name) if name else port


def service_command(python: str, config: Path | str) -> str:
    """The service's command line: this Python hosts the service itself, the config path stored with it."""
    return subprocess.list2cmdline([python, "-m", "labmeter", "agent", "service", "--config", str(config)])


def failure_args() -> list[str]:
    """``sc failure`` for the service: the SCM restarts an agent that died."""
    return ["sc", "failure", SERVICE_NAME, *FAILURE_ACTIONS]


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The selector event loop on Windows, not the default proactor (IOCP) one.

    Under Wine the proactor's ``_poll`` crashed the process at shutdown (an access violation reading
    STATUS_CANCELLED as an address, 2 runs in 6); the agent needs a few sockets, which ``select``
    handles, and pymodbus and pyserial poll serial ports in either loop.
    """
    return asyncio.SelectorEventLoop if WINDOWS else None


CTRL_C, CTRL_BREAK, CTRL_CLOSE, CTRL_LOGOFF, CTRL_SHUTDOWN = 0, 1, 2, 5, 6
CLOSE_WAIT_S = 4.5  # Windows ends a console process 5 s after CTRL_CLOSE_EVENT


def on_console_stop(stop: Callable[[], object], done: threading.Event | None = None) -> None:
    """Call ``stop`` on Ctrl-C, Ctrl-Break, a closed console window or a shutdown (Windows only).

    A console control handler, not signal.signal: it runs in the thread Windows creates for the
    event and goes first, so the C runtime's SIGINT path (whose wakeup write races the event loop
    under Wine) never runs. A closed window is given until ``done`` is set, at most CLOSE_WAIT_S.
    """
    try:
        import win32api
    except ImportError:
        import signal

        for sig in (signal.SIGINT, signal.SIGBREAK):  # type: ignore[attr-defined]
            signal.signal(sig, lambda _n, _f: stop())
        return

    def handler(event: int) -> bool:
        if event == CTRL_LOGOFF:  # a user logging off is no reason to stop metering
            return True
        stop()
        if event in (CTRL_CLOSE, CTRL_SHUTDOWN) and done is not None:
            done.wait(CLOSE_WAIT_S)
        return True

    win32api.SetConsoleCtrlHandler(handler, True)


def program_data() -> Path:
    """``%ProgramData%\\labmeter``: the agent's key, state and log when the config does not say."""
    return Path(os.environ.get("PROGRAMDATA") or r"C:\ProgramData") / "labmeter"


def posix_rooted(path: str) -> bool:
    """``/var/lib/labmeter`` on Windows: rooted but without a drive, so it would land on the current drive."""
    p = PureWindowsPath(path)
    return bool(p.root) and not p.drive


def icacls_grants(account: str | None) -> list[str]:
    """The ACL a secret gets: full control for SYSTEM, Administrators and the account running the agent."""
    grants = [f"*{SYSTEM_SID}:(F)", f"*{ADMINISTRATORS_SID}:(F)"]
    if account and account not in (SYSTEM_SID, ADMINISTRATORS_SID):
        grants.append(f"*{account}:(F)" if account.startswith("S-1-") else f"{account}:(F)")
    return grants


def icacls_args(path: Path | str, account: str | None, remove: list[str] | None = None) -> list[str]:
    """icacls arguments that drop inherited entries, grant only ``icacls_grants`` and remove ``remove``."""
    args = ["icacls", str(path), "/inheritance:r", "/grant:r", *icacls_grants(account)]
    if remove:
        args += ["/remove:g", *(f"*{s}" if s.startswith("S-1-") else s for s in remove)]
    return args


def icacls_command(path: Path | str, account: str | None, remove: list[str] | None = None) -> str:
    """The command to type in an elevated prompt, quoted for cmd.exe."""
    return subprocess.list2cmdline(icacls_args(path, account, remove))


def readers_among(aces: list[tuple[int, int, str]], allowed: set[str]) -> list[str]:
    """SIDs other than ``allowed`` that an ACL lets read: ``aces`` are (type, mask, SID string)."""
    out: list[str] = []
    for ace_type, mask, sid in aces:
        if ace_type == _ACCESS_ALLOWED and mask & _READ_MASK and sid not in allowed and sid not in out:
            out.append(sid)
    return out


def sid_label(sid: str) -> str:
    return WELL_KNOWN.get(sid, sid)


def current_sid() -> str:  # pragma: no cover - Windows only
    import win32api
    import win32security

    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(), win32security.TOKEN_QUERY)
    sid = win32security.GetTokenInformation(token, win32security.TokenUser)[0]
    return str(win32security.ConvertSidToStringSid(sid))


def protect(path: Path) -> None:  # pragma: no cover - Windows only
    """Give ``path`` (created empty, before the secret goes in) an explicit, non-inherited ACL."""
    try:
        import ntsecuritycon
        import win32security
    except ImportError:
        account = os.environ.get("USERNAME")
        result = subprocess.run(icacls_args(path, account), capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{path}: icacls failed: {(result.stdout + result.stderr).strip()}") from None
        return
    try:
        _set_dacl(path, win32security, ntsecuritycon)
    except Exception as exc:  # pywintypes.error is not an OSError
        raise OSError(f"{path}: cannot set its access list ({exc})") from None


def _set_dacl(path: Path, win32security: Any, ntsecuritycon: Any) -> None:  # pragma: no cover - Windows only
    dacl = win32security.ACL()
    for sid in dict.fromkeys((SYSTEM_SID, ADMINISTRATORS_SID, current_sid())):
        dacl.AddAccessAllowedAce(
            win32security.ACL_REVISION,
            ntsecuritycon.FILE_ALL_ACCESS,
            win32security.ConvertStringSidToSid(sid),
        )
    win32security.SetNamedSecurityInfo(
        str(path),
        win32security.SE_FILE_OBJECT,
        win32security.DACL_SECURITY_INFORMATION | win32security.PROTECTED_DACL_SECURITY_INFORMATION,
        None,
        None,
        dacl,
        None,
    )


@functools.cache
def under_wine() -> bool:  # pragma: no cover - Windows only
    """Wine keeps no ACLs (it derives one from the Unix mode bits), so there is nothing to check there."""
    import ctypes

    try:
        return hasattr(ctypes.WinDLL("ntdll"), "wine_get_version")  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return False


def readable_by(path: Path) -> tuple[list[str], str] | None:  # pragma: no cover - Windows only
    """Who else may read ``path`` and the icacls command that fixes it; None when only the allowed can."""
    try:
        import win32security
    except ImportError:
        return None  # pywin32 is a dependency on Windows; without it there is nothing to read the ACL with
    if under_wine():
        return None
    me = current_sid()
    sd = win32security.GetNamedSecurityInfo(
        str(path), win32security.SE_FILE_OBJECT, win32security.DACL_SECURITY_INFORMATION
    )
    dacl = sd.GetSecurityDescriptorDacl()
    if dacl is None:  # a NULL DACL lets everyone do everything
        others = ["S-1-1-0"]
    else:
        aces = []
        for i in range(dacl.GetAceCount()):
            (ace_type, _flags), mask, sid = dacl.GetAce(i)
            aces.append((ace_type, mask & 0xFFFFFFFF, str(win32security.ConvertSidToStringSid(sid))))
        others = readers_among(aces, {SYSTEM_SID, ADMINISTRATORS_SID, me})
    if not others:
        return None
    return [sid_label(s) for s in others], icacls_command(path, me, others)


def secret_problem(path: Path) -> str | None:
    """Why a secret file (key, salt) must not be used: readable by others, and the command that fixes it."""
    if not WINDOWS:
        return None
    found = readable_by(path)
    if found is None:
        return None
    who, fix = found
    return f"{path}: readable by {', '.join(who)}; run in an elevated prompt: {fix}"
