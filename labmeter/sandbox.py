"""What a systemd unit's sandbox lets its service read and write, checked before the unit is installed.

The shipped units run with ``ProtectSystem=strict``, ``ProtectHome=yes`` and ``PrivateTmp=yes``: a
state_dir in /srv, a password file in /root or a CA in /tmp passes every other check and then fails at
start (read-only file system, file not found). ``problems`` names each such path and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath


@dataclass
class Sandbox:
    protect_system: str = "no"
    protect_home: str = "no"
    private_tmp: bool = False
    writable: list[PurePosixPath] = field(default_factory=list)  # ReadWritePaths and the unit's own dirs
    read_only: list[PurePosixPath] = field(default_factory=list)
    hidden: list[PurePosixPath] = field(default_factory=list)


_DIRS = {
    "StateDirectory": "/var/lib",
    "LogsDirectory": "/var/log",
    "CacheDirectory": "/var/cache",
    "RuntimeDirectory": "/run",
}
_YES = {"yes", "true", "1", "on"}


def parse_unit(text: str) -> Sandbox:
    sb = Sandbox()
    for raw in text.splitlines():
        line = raw.strip()
        if "=" not in line or line.startswith(("#", ";", "[")):
            continue
        key, value = (p.strip() for p in line.split("=", 1))
        paths = [PurePosixPath(v.lstrip("-+")) for v in value.split()]
        if key == "ProtectSystem":
            sb.protect_system = "yes" if value.lower() in _YES else value.lower()
        elif key == "ProtectHome":
            sb.protect_home = "yes" if value.lower() in _YES else value.lower()
        elif key == "PrivateTmp":
            sb.private_tmp = value.lower() in _YES
        elif key == "ReadWritePaths":
            sb.writable += paths
        elif key == "ReadOnlyPaths":
            sb.read_only += paths
        elif key == "InaccessiblePaths":
            sb.hidden += paths
        elif key in _DIRS:
            sb.writable += [PurePosixPath(_DIRS[key]) / v for v in value.split()]
    return sb


def _under(path: PurePosixPath, roots: list[PurePosixPath]) -> PurePosixPath | None:
    return next((r for r in roots if path == r or r in path.parents), None)


def _hidden_by(sb: Sandbox, path: PurePosixPath) -> str | None:
    if sb.private_tmp and _under(path, [PurePosixPath("/tmp"), PurePosixPath("/var/tmp")]):
        return "PrivateTmp=yes gives the service its own empty /tmp and /var/tmp"
    home = [PurePosixPath("/home"), PurePosixPath("/root"), PurePosixPath("/run/user")]
    if sb.protect_home in ("yes", "tmpfs") and _under(path, home):
        return f"ProtectHome={sb.protect_home} hides /home, /root and /run/user from the service"
    root = _under(path, sb.hidden)
    if root is not None:
        return f"InaccessiblePaths={root}"
    return None


def _read_only_by(sb: Sandbox, path: PurePosixPath) -> str | None:
    if _under(path, sb.writable) is not None:
        return None
    if _under(path, [PurePosixPath("/dev"), PurePosixPath("/proc"), PurePosixPath("/sys")]) is not None:
        return None
    if sb.protect_system == "strict":
        return "ProtectSystem=strict makes everything but its StateDirectory and ReadWritePaths read-only"
    system = [PurePosixPath(p) for p in ("/usr", "/boot", "/efi")]
    if sb.protect_system == "full":
        system.append(PurePosixPath("/etc"))
    if sb.protect_system in ("yes", "full") and _under(path, system):
        return f"ProtectSystem={sb.protect_system} makes {_under(path, system)} read-only"
    if sb.protect_home == "read-only" and _under(path, [PurePosixPath("/home"), PurePosixPath("/root")]):
        return "ProtectHome=read-only"
    root = _under(path, sb.read_only)
    if root is not None:
        return f"ReadOnlyPaths={root}"
    return None


def problems(
    sb: Sandbox, reads: list[tuple[str, PurePosixPath]], writes: list[tuple[str, PurePosixPath]]
) -> list[str]:
    """One sentence per configured path the service could not read (``reads``) or write (``writes``)."""
    out = []
    for what, path in reads:
        why = _hidden_by(sb, path)
        if why:
            out.append(
                f"{what} = {path}: the service cannot read it ({why}); move it, e.g. to /etc/labmeter/"
            )
    state = ", ".join(str(w) for w in sb.writable) or "none"
    for what, path in writes:
        why = _hidden_by(sb, path) or _read_only_by(sb, path)
        if why:
            out.append(
                f"{what} = {path}: the service cannot write there ({why}); use a directory it may write "
                f"({state}), or add ReadWritePaths={path} to the unit"
            )
    return out
