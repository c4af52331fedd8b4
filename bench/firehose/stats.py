"""Latency histograms and per-second counters, cheap to fill and to merge across processes.

Latencies go into log-scale buckets 5 % wide (from 1 µs to hours), so a process sends a
small sparse dict per second instead of every sample, the parent merges them exactly, and
any percentile is known to within 5 %.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

_RATIO = 1.05
_LOG_RATIO = math.log(_RATIO)


def bucket(seconds: float) -> int:
    """The histogram bucket of a latency in seconds."""
    us = seconds * 1e6
    if us < 1.0:
        return 0
    return int(math.log(us) / _LOG_RATIO) + 1


def bucket_ms(b: int) -> float:
    """A representative latency (ms) for bucket ``b``: the geometric middle of its range."""
    if b <= 0:
        return 0.0005
    return _RATIO ** (b - 0.5) / 1000.0


def merge(into: dict[int, int], other: dict[int, int]) -> None:
    for b, n in other.items():
        into[b] = into.get(b, 0) + n


def percentile(hist: dict[int, int], q: float) -> float | None:
    """The q-th percentile (0-100) in ms, or None for an empty histogram."""
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(total * q / 100.0))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return bucket_ms(b)
    return bucket_ms(max(hist))


@dataclass(slots=True)
class Second:
    """What one load process saw during one second of the run."""

    sec: int
    held: int = 0  # connections logged in and held at the end of the second
    inflight: int = 0  # connection attempts not finished at the end of the second
    opened: int = 0  # successful logins
    closed: int = 0  # connections closed on purpose (churn)
    queries: int = 0  # queries that completed without error
    skipped: int = 0  # queries due while no held connection was idle
    connect_failures: Counter = field(default_factory=Counter)
    query_failures: Counter = field(default_factory=Counter)
    drops: Counter = field(default_factory=Counter)  # idle connections the server closed
    qlat: dict[int, int] = field(default_factory=dict)
    clat: dict[int, int] = field(default_factory=dict)
    cpu_pct: float = 0.0
    lag_ms: float = 0.0
    samples: dict[str, str] = field(default_factory=dict)  # failure kind -> one full message

    def to_msg(self) -> dict:
        return {
            "sec": self.sec,
            "held": self.held,
            "inflight": self.inflight,
            "opened": self.opened,
            "closed": self.closed,
            "queries": self.queries,
            "skipped": self.skipped,
            "connect_failures": dict(self.connect_failures),
            "query_failures": dict(self.query_failures),
            "drops": dict(self.drops),
            "qlat": self.qlat,
            "clat": self.clat,
            "cpu_pct": self.cpu_pct,
            "lag_ms": self.lag_ms,
            "samples": self.samples,
        }
