"""A log limiter for messages a guest can trigger at will: the first few, then every power of two.

A guest that polls a missing device or keeps sending bad requests must not flood pyvmm's log (or fill
the disk under it) while each kind of trouble is still reported, with its running count.
"""

from __future__ import annotations


class LogLimiter:
    """Counts occurrences; :meth:`tick` says whether this one should be logged."""

    def __init__(self, first: int = 8) -> None:
        self.first = first
        self.count = 0

    def tick(self) -> bool:
        """Count one occurrence; True for the first ``first`` ones and then for the 16th, 32nd, 64th..."""
        self.count += 1
        n = self.count
        return n <= self.first or n & (n - 1) == 0
