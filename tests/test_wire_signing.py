"""Keys, signatures and the envelope."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from labmeter import signing, wire


def test_key_file_is_private_and_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "agent.key"
    key = signing.generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(signing.KeyFileError, match="exists"):
        signing.generate_key_file(path)
    loaded = signing.load_private_key(path)
    assert signing.public_key_text(loaded.public_key()) == signing.public_key_text(key.public_key())
    path.chmod(0o644)
    with pytest.raises(signing.KeyFileError, match="chmod 600"):
        signing.load_private_key(path)


def test_envelope_round_trip_and_tamper(tmp_path: Path) -> None:
    key = signing.generate_key_file(tmp_path / "k")
    pub = key.public_key()
    iv = wire.Interval("a", "i", 1, wire.GENESIS, 1_700_000_000_000, 1_700_000_060_000, "RUNNING")
    body = wire.dump_body(iv.body())
    env = wire.open_envelope(wire.seal(key, signing.key_id(pub), body))
    assert signing.verify(pub, env.body.encode(), env.sig)
    assert wire.parse_interval(wire.load_body(env.body)) == iv
    tampered = env.body.replace("RUNNING", "STANDBY")
    assert not signing.verify(pub, tampered.encode(), env.sig)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'{"kid":"x","body":1,"sig":"y"}', "string fields"),
        (b"x" * (wire.MAX_PAYLOAD + 1), "exceeds"),
    ],
)
def test_bad_envelopes(payload: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.open_envelope(payload)


def test_public_key_text_errors() -> None:
    with pytest.raises(signing.KeyFileError, match="expected 'ed25519:"):
        signing.parse_public_key("ssh-ed25519 AAAA")


def test_two_processes_creating_the_collector_key_at_once_end_with_one_key(tmp_path: Path) -> None:
    """Collectors that start together must not each create (and sign acks with) a different key."""
    import concurrent.futures

    path = tmp_path / "collector.key"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: signing.load_or_create_key(path), range(16)))
    keys = {signing.public_key_text(k.public_key()) for k, _ in results}
    assert len(keys) == 1
    assert sum(created for _, created in results) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["collector.key"]
    assert path.stat().st_mode & 0o777 == 0o600
