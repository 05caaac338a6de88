"""Ed25519 keys and signatures (libsodium through PyNaCl): the one place that signs and verifies.

Key files are PEM/PKCS#8, the format ``openssl pkey`` reads. libsodium verifies about
twice as fast as OpenSSL here and releases the GIL, so the collector's signature
checks overlap with MQTT receive; and the agent needs no second crypto library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from labmeter import winsys

KEY_PREFIX = "ed25519:"
# DER of a PKCS#8 Ed25519 private key is this fixed prefix followed by the 32-byte seed (RFC 8410).
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BEGIN, _PEM_END = "-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----"

PublicKey = VerifyKey


class KeyFileError(Exception):
    """A key file or key text that cannot be used."""


class PrivateKey:
    """An agent's signing key."""

    def __init__(self, seed: bytes) -> None:
        self._key = SigningKey(seed)
        self._seed = seed

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(bytes(SigningKey.generate()))

    def public_key(self) -> PublicKey:
        return self._key.verify_key

    def sign(self, data: bytes) -> bytes:
        return bytes(self._key.sign(data).signature)

    def pem(self) -> bytes:
        b64 = base64.b64encode(_PKCS8_PREFIX + self._seed).decode()
        return f"{_PEM_BEGIN}\n{b64}\n{_PEM_END}\n".encode()


def generate_key_file(path: Path, force: bool = False) -> PrivateKey:
    """Create a private key readable by the owner only (0600), refusing to overwrite by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise KeyFileError(
            f"{path}: key file exists; use --force to replace it (agents enrolled with it stop verifying)"
        )
    key = PrivateKey.generate()
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")  # mode 0600
    tmp = Path(name)
    try:
        if winsys.WINDOWS:  # mode bits mean nothing there: the ACL is set while the file is still empty
            try:
                winsys.protect(tmp)
            except OSError as exc:
                os.close(fd)
                fd = -1
                tmp.unlink()
                raise KeyFileError(str(exc)) from None
        os.write(fd, key.pem())
        os.fsync(fd)
    finally:
        if fd >= 0:
            os.close(fd)
    os.chmod(tmp, 0o600)
    if force:
        os.replace(tmp, path)
        return key
    try:
        os.link(tmp, path)  # atomic: of two processes creating the key at once, exactly one wins
    except FileExistsError:
        raise KeyFileError(
            f"{path}: key file exists; use --force to replace it (agents enrolled with it stop verifying)"
        ) from None
    finally:
        os.unlink(tmp)
    return key


def load_or_create_key(path: Path) -> tuple[PrivateKey, bool]:
    """The key at ``path``, created (0600) on first use; the flag says whether it was just created.

    The collector's own key comes into being this way on its first start, so an upgrade needs no step.
    """
    if path.exists():
        return load_private_key(path), False
    try:
        return generate_key_file(path), True
    except KeyFileError:
        if path.exists():  # another process created it a moment ago
            return load_private_key(path), False
        raise


def load_private_key(path: Path) -> PrivateKey:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no key file; create one with `labmeter agent enroll`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc})") from None
    if winsys.WINDOWS:
        problem = winsys.secret_problem(path)
        if problem:
            raise KeyFileError(problem)
    elif mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: private key is readable by others (mode {mode & 0o777:o}); run chmod 600 {path}"
        )
    lines = [ln.strip() for ln in text.strip().splitlines()]
    try:
        if lines[0] != _PEM_BEGIN or lines[-1] != _PEM_END:
            raise ValueError("not a PEM private key")
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (IndexError, ValueError, binascii.Error) as exc:
        raise KeyFileError(f"{path}: not a PEM private key ({exc})") from None
    if len(der) != 48 or not der.startswith(_PKCS8_PREFIX):
        raise KeyFileError(f"{path}: not an Ed25519 PKCS#8 key")
    return PrivateKey(der[16:])


def public_key_text(key: PublicKey) -> str:
    return KEY_PREFIX + base64.b64encode(bytes(key)).decode()


def parse_public_key(text: str) -> PublicKey:
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise KeyFileError(
            f"public key {text!r}: expected 'ed25519:<base64>' as printed by `labmeter agent enroll`"
        )
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes, expected 32")
        return VerifyKey(raw)
    except (ValueError, binascii.Error) as exc:
        raise KeyFileError(f"public key {text!r}: {exc}") from None


def key_id(key: PublicKey) -> str:
    """Short fingerprint carried in every envelope, so a collector can pick the key."""
    return hashlib.sha256(bytes(key)).hexdigest()[:16]


def sign(key: PrivateKey, body: bytes) -> str:
    return base64.b64encode(key.sign(body)).decode()


class SignatureChecker:
    """Checks signatures of one public key; build once per key, call per message."""

    def __init__(self, key: PublicKey) -> None:
        self._key = key

    def __call__(self, body: bytes, sig: str) -> bool:
        try:
            self._key.verify(body, binascii.a2b_base64(sig, strict_mode=True))
        except (BadSignatureError, binascii.Error, ValueError):
            return False
        return True


def verify(key: PublicKey, body: bytes, sig: str) -> bool:
    return SignatureChecker(key)(body, sig)
