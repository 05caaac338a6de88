"""Per-message cost of what the collector does to every interval message before storing it: the Ed25519
signature check (PyNaCl, libsodium) and the envelope/body decoding as collector/verify.py does it, next to a SHA-256 of the same body as
the baseline measured in the same run.

This is the measurement behind docs/decisions.md "libsodium for signatures" and the per-message budget in
docs/performance.md. If `cryptography` happens to be installed, its OpenSSL check is timed too (it is not a
dependency: the comparison that made the choice is not repeated by default).

    .venv/bin/python -m benchmarks.verify [--n 20000]
"""

from __future__ import annotations

import argparse
import hashlib
import timeit

from benchmarks.common import Verdicts
from labmeter import signing, wire

# Ingest's target needs >= 10,000 msg/s from two cores shared with Mosquitto: at most 100 us of checking
# and decoding per message on one core leaves the other for the broker and storage.
BUDGET_US = 100.0


def per_call_us(fn: object, n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    n = ap.parse_args().n
    key = signing.PrivateKey.generate()
    body = wire.dump_body(
        wire.Interval("agent-01", "CZ-XRD-001", 42, wire.GENESIS, 1, 60_001, "RUNNING").body()
    )
    payload = wire.seal(key, signing.key_id(key.public_key()), body)
    env = wire.open_envelope(payload)
    raw = env.body.encode()
    check = signing.SignatureChecker(key.public_key())
    assert check(raw, env.sig)

    sha_us = per_call_us(lambda: hashlib.sha256(raw).digest(), n)
    nacl_us = per_call_us(lambda: check(raw, env.sig), n)
    decode_us = per_call_us(lambda: wire.decode_interval(wire.open_envelope(payload).body), n)
    print(f"baseline sha256 of the body: {sha_us:.2f} us")
    print(f"Ed25519 check, PyNaCl (libsodium): {nacl_us:.1f} us ({nacl_us / sha_us:.0f}x baseline)")
    print(f"envelope + body decode (msgspec): {decode_us:.1f} us ({decode_us / sha_us:.0f}x baseline)")
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        print("cryptography is not installed: no OpenSSL comparison (not a dependency)")
    else:
        import base64

        ossl = Ed25519PublicKey.from_public_bytes(bytes(key.public_key()._key))  # type: ignore[attr-defined]
        sig = base64.b64decode(env.sig)
        ossl_us = per_call_us(lambda: ossl.verify(sig, raw), n)
        print(f"Ed25519 check, cryptography (OpenSSL): {ossl_us:.1f} us ({ossl_us / nacl_us:.2f}x PyNaCl)")
    verdicts = Verdicts()
    total = nacl_us + decode_us
    verdicts.check(
        "check + decode per message", round(total, 1), f"<= {BUDGET_US:g} us", total <= BUDGET_US, " us"
    )
    verdicts.exit()


if __name__ == "__main__":
    main()
