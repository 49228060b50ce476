"""The log limiter for guest-triggered messages: the first few, then every power of two."""

from __future__ import annotations

from pyvmm.devices.ratelimit import LogLimiter


def test_first_eight_then_powers_of_two() -> None:
    limiter = LogLimiter()
    logged = [n for n in range(1, 5000) if limiter.tick()]
    assert logged == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert limiter.count == 4999
    two = LogLimiter(first=2)
    assert [n for n in range(1, 10) if two.tick()] == [1, 2, 4, 8]
