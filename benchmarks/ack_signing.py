"""What signing acknowledgements costs the collector, next to what it already spends per message.

A batch of up to 2,000 messages is acknowledged with one signed ack per agent in it. This times
``wire.seal_acks`` for an agent with 10 chains and, in the same run, the signature check every
interval message already needs; the ratio says how many messages' worth of work one ack is.

    .venv/bin/python -m benchmarks.ack_signing [--n 5000]
"""

from __future__ import annotations

import argparse
import timeit

from benchmarks.common import Verdicts
from labmeter import signing, wire


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    n = ap.parse_args().n
    key = signing.PrivateKey.generate()
    acks = {f"CZ-{i:03d}": wire.AckEntry(1_780_000_000_000 + i, f"{i:064x}") for i in range(10)}
    seal_s = min(timeit.repeat(lambda: wire.seal_acks(key, "agent-01", 1, acks, []), number=n, repeat=3)) / n
    body = wire.dump_body(wire.Interval("a", "I", 1, wire.GENESIS, 1, 2, "OFF").body())
    env = wire.open_envelope(wire.seal(key, "kid", body))
    check = signing.SignatureChecker(key.public_key())
    check_s = min(timeit.repeat(lambda: check(env.body.encode(), env.sig), number=n, repeat=3)) / n
    print(
        f"seal_acks, 10 chains: {seal_s * 1e6:.1f} us; interval signature check: {check_s * 1e6:.1f} us; "
        f"one ack = {seal_s / check_s:.2f} message(s) of signature checking"
    )
    # a batch of 2,000 messages from 10 agents sends 10 acks: their signing against the batch's checks
    share = 10 * seal_s / (2000 * check_s)
    verdicts = Verdicts()
    verdicts.check(
        "ack signing per batch, share of its signature checks",
        round(100 * share, 2),
        "<= 1 %",
        share <= 0.01,
        " %",
    )
    verdicts.exit()


if __name__ == "__main__":
    main()
