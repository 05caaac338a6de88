"""The collector's own Ed25519 identity: it signs acknowledgements and countersigns evidence.

Agents pin its public key, so nobody else on the broker can make an agent drop data. The key
is created on the collector's first start (an upgrade needs no step); collectors sharing a
ledger must share it.
"""

from __future__ import annotations

import logging

from labmeter import signing
from labmeter.config import CollectorSection

log = logging.getLogger("labmeter.collector")


def collector_key(section: CollectorSection) -> signing.PrivateKey:
    """Load the collector's key, creating it (0600) on first use and saying so once."""
    key, created = signing.load_or_create_key(section.key_path)
    if created:
        log.warning(
            "created the collector key %s (fingerprint %s); agents pin %s",
            section.key_path,
            signing.key_id(key.public_key()),
            signing.public_key_text(key.public_key()),
        )
    return key
