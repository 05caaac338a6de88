"""The hour-counting rules, kept in the core (``labmeter.machine_hours``) so ``labmeter verify`` needs no collector.

The collector's modules import them from here as before.
"""

from labmeter.machine_hours import (
    FIELDS,
    KIND_FIELDS,
    UNVERIFIED,
    Hours,
    Segment,
    compute,
    compute_buckets,
    intersect,
    merge,
    spread,
    union,
)

__all__ = [
    "FIELDS",
    "KIND_FIELDS",
    "UNVERIFIED",
    "Hours",
    "Segment",
    "compute",
    "compute_buckets",
    "intersect",
    "merge",
    "spread",
    "union",
]
