"""The soak verdict (pyvmm.testing.soak.judge) catches a leak of fds, threads or memory."""

from __future__ import annotations

from pyvmm.testing.soak import MiB, Sample, judge


def samples(fds: list[int], rss_mib: list[float], threads: int = 3) -> list[Sample]:
    return [Sample(float(i), int(r * MiB), f, threads) for i, (f, r) in enumerate(zip(fds, rss_mib, strict=True))]


def test_flat_passes_and_each_kind_of_leak_fails() -> None:
    assert judge(samples([9, 10, 10, 10, 10], [40, 50, 51, 50, 52]), warmup=1, rss_growth_max=8 * MiB, what="x").ok
    assert not judge(samples([10, 10, 11, 12, 13], [50] * 5), warmup=1, rss_growth_max=8 * MiB, what="fd").ok
    assert not judge(samples([10] * 5, [50, 52, 56, 60, 70]), warmup=1, rss_growth_max=8 * MiB, what="rss").ok
    leak = samples([10] * 5, [50] * 5)
    leak[-1].threads = 4
    assert not judge(leak, warmup=1, rss_growth_max=8 * MiB, what="threads").ok
    assert not judge(samples([10], [50]), warmup=1, rss_growth_max=MiB, what="short").ok
