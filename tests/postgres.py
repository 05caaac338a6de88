"""A throwaway PostgreSQL server from Debian's packages, for tests and benchmarks.

initdb into a temporary folder with password (SCRAM) authentication, listening on
127.0.0.1 only; as root, the server runs as the ``postgres`` user, which refuses root.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from labmeter.netutil import free_port

USER, PASSWORD = "labmeter", "test-only-secret"


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, fsync: bool = False) -> None:
        """``fsync``: the server's durability path as shipped (fsync on, synchronous_commit on); off by
        default, which is safe for throwaway data and far quicker on a shared disk."""
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (make deps installs Debian's postgresql)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="labmeter-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        self.fsync = fsync

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self, tls: Path | None = None) -> PostgresServer:
        """``tls``: a folder with server.pem and server.key; the server then accepts TLS only."""
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        )
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=50" + (
            "" if self.fsync else " -c fsync=off"
        )
        if tls is not None:
            for name in ("server.pem", "server.key"):
                shutil.copy(tls / name, self.root / name)
                (self.root / name).chmod(0o600)
                if self._as_postgres:
                    shutil.chown(self.root / name, "postgres")
            opts += (
                f" -c ssl=on -c ssl_cert_file={self.root}/server.pem -c ssl_key_file={self.root}/server.key"
            )
            (self.data / "pg_hba.conf").write_text(
                "local all all scram-sha-256\n"
                "hostssl all all 127.0.0.1/32 scram-sha-256\n"
                "hostnossl all all 0.0.0.0/0 reject\n"
            )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
