"""Ed25519 keys and signatures: the one place that signs and verifies.

Key files are PEM/PKCS#8 (cryptography, readable by openssl). Verification, the
collector's hot path, uses libsodium through PyNaCl: about twice as fast as
OpenSSL's here, and it releases the GIL, so it overlaps with MQTT receive.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

KEY_PREFIX = "ed25519:"


class KeyFileError(Exception):
    """A key file or key text that cannot be used."""


def generate_key_file(path: Path, force: bool = False) -> Ed25519PrivateKey:
    """Create a private key readable by the owner only (0600), refusing to overwrite by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise KeyFileError(
            f"{path}: key file exists; use --force to replace it (agents enrolled with it stop verifying)"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no key file; create one with `labmeter agent enroll`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: private key is readable by others (mode {mode & 0o777:o}); run chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    if not text.startswith(KEY_PREFIX):
        raise KeyFileError(
            f"public key {text!r}: expected 'ed25519:<base64>' as printed by `labmeter agent enroll`"
        )
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyFileError(f"public key {text!r}: {exc}") from None


def key_id(key: Ed25519PublicKey) -> str:
    """Short fingerprint carried in every envelope, so a collector can pick the key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, body: bytes) -> str:
    return base64.b64encode(key.sign(body)).decode()


class SignatureChecker:
    """Checks signatures of one public key; build once per key, call per message."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = VerifyKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def __call__(self, body: bytes, sig: str) -> bool:
        try:
            self._key.verify(body, binascii.a2b_base64(sig, strict_mode=True))
        except (BadSignatureError, binascii.Error, ValueError):
            return False
        return True


def verify(key: Ed25519PublicKey, body: bytes, sig: str) -> bool:
    return SignatureChecker(key)(body, sig)
