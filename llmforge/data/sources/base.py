"""What every reader yields and counts: documents and `skipped:<reason>`-style counters."""

from __future__ import annotations

from dataclasses import dataclass, field

Stats = dict  # str -> int counters


@dataclass
class Document:
    text: str
    id: str
    meta: dict = field(default_factory=dict)


def count(stats: Stats, key: str, n: int = 1) -> None:
    stats[key] = stats.get(key, 0) + n
