"""Accounts for a secured Mosquitto: password-file lines (the ``$7$`` PBKDF2-SHA512 format of
mosquitto_passwd) and ACL blocks that let an agent publish only under its own id."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from pathlib import Path

ITERATIONS = 101  # mosquitto_passwd's own default


def password_line(user: str, password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"{user}:$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def acl_block(user: str, role: str) -> str:
    if role == "collector":
        return f"user {user}\ntopic read labmeter/v1/#\ntopic write labmeter/v1/+/ack\n"
    return (
        f"user {user}\ntopic write labmeter/v1/{user}/#\ntopic read labmeter/v1/{user}/ack\n"
        "topic read tele/#\ntopic read shellies/#\ntopic read zigbee2mqtt/#\n"
    )


def _replace_user(text: str, user: str, new: str, block: bool) -> str:
    if block:
        pattern = re.compile(rf"^user {re.escape(user)}\n(?:(?!user ).*\n)*", re.M)
    else:
        pattern = re.compile(rf"^{re.escape(user)}:.*\n", re.M)
    text = pattern.sub("", text)
    return (
        text + ("\n" if text and not text.endswith("\n") else "") + new + ("" if new.endswith("\n") else "\n")
    )


def add_account(directory: Path, user: str, role: str) -> tuple[Path, str]:
    """Create or replace ``user`` in DIR/passwd and DIR/acl; its new password goes to DIR/secrets/USER.pass (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    passwd, acl = directory / "passwd", directory / "acl"
    passwd.write_text(
        _replace_user(
            passwd.read_text() if passwd.exists() else "", user, password_line(user, password), block=False
        )
    )
    os.chmod(passwd, 0o600)
    acl.write_text(
        _replace_user(acl.read_text() if acl.exists() else "", user, acl_block(user, role), block=True)
    )
    secret = directory / "secrets" / f"{user}.pass"
    secret.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, password.encode() + b"\n")
    finally:
        os.close(fd)
    return secret, acl_block(user, role)
