"""The stop report without KVM: verdicts, the report window, the line format and reading it back."""

from __future__ import annotations

import pytest

from pyvmm.stopreport import ProgressWatch, VcpuReport, parse_report, report_lines, verdict


def test_verdicts() -> None:
    assert verdict(exits=0, rip=0x1000, rip_before=0x1000) == "stuck"
    assert verdict(exits=0, rip=0x1000, rip_before=None) == "stuck"  # one observation: exits decide
    assert verdict(exits=0, rip=None, rip_before=None) == "stuck"
    assert verdict(exits=0, rip=0x1004, rip_before=0x1000) == "slow"  # no exits, but it moved
    assert verdict(exits=5, rip=0x1000, rip_before=0x1000) == "slow"


def test_lines_have_the_documented_format() -> None:
    stuck = VcpuReport(0, 0x1000000, "startup_64+0x0", True, 0, 1.0, "stuck")
    slow = VcpuReport(1, 0xFFFFFFFF81234567, "serial8250_console_write+0x57", False, 2113, 1.0, "slow")
    unknown = VcpuReport(2, None, None, True, 0, 0.6, "stuck")
    assert report_lines([stuck, slow, unknown], "[    1.234] Run /init as init process") == [
        "vCPU 0 stuck at 0x1000000 <startup_64+0x0> in the guest; 0 exits in the last 1.0 s",
        "vCPU 1 slow at 0xffffffff81234567 <serial8250_console_write+0x57> in the VMM; 2113 exits in the last 1.0 s",
        "vCPU 2 stuck at an unknown address in the guest; 0 exits in the last 0.6 s",
        "last console line: [    1.234] Run /init as init process",
    ]
    assert report_lines([VcpuReport(0, 0x1234, None, True, 0, 1.0, "stuck")], None) == [
        "vCPU 0 stuck at 0x1234 in the guest; 0 exits in the last 1.0 s",
        "last console line: (no console output)",
    ]
    assert report_lines([], "anything") == []


def test_report_read_back_from_pyvmm_stderr() -> None:
    reports = [VcpuReport(0, 0x1000000, "startup_64+0x0", True, 0, 1.0, "stuck"),
               VcpuReport(1, 0xFFFFFFFF81234567, None, False, 2113, 1.2, "slow"),
               VcpuReport(2, None, None, True, 0, 1.0, "stuck")]
    log = "pyvmm: kernel x (elf)\n" + "".join(f"pyvmm: {line}\r\n" for line in report_lines(reports, "x"))
    assert parse_report(log) == reports
    assert parse_report("pyvmm: guest powered off after 1.0 s\n") == []


def _watch(*marks: tuple[float, int]) -> ProgressWatch:
    w = ProgressWatch([0])
    for t, exits in marks:
        w.vcpu(0).exits = exits
        w.mark(t)
    return w


def test_the_window_is_the_mark_closest_to_one_second_before_the_stop() -> None:
    w = _watch((0.0, 0), (0.5, 10), (1.0, 30), (1.5, 60), (2.0, 100))
    w.vcpu(0).exits = 150
    w.mark_stop(2.4)
    [r] = w.reports({0: 0x10}, None)
    assert r.window_s == pytest.approx(0.9)  # from the mark at 1.5
    assert r.exits_last_s == 90


def test_a_short_run_reports_since_its_start() -> None:
    w = _watch((0.0, 0))
    w.vcpu(0).exits = 7
    w.mark_stop(0.3)
    [r] = w.reports({0: 0x10}, None)
    assert (r.window_s, r.exits_last_s, r.verdict) == (pytest.approx(0.3), 7, "slow")


def test_reports_combine_state_rips_and_symbols() -> None:
    w = ProgressWatch([0, 1, 2])
    w.mark(10.0)
    w.vcpu(0).enter()
    w.vcpu(0).leave(in_guest=True)
    w.vcpu(0).rip_before = 0x2000
    w.vcpu(1).enter()
    w.vcpu(1).exits = 40
    w.vcpu(1).leave(in_guest=False)
    w.vcpu(2).enter()  # never left KVM_RUN: still in the guest, registers unreadable
    w.mark_stop(11.0)
    names = {0x2000: "spin+0x0"}
    r0, r1, r2 = w.reports({0: 0x2000, 1: 0x3000, 2: None}, names.get)
    assert r0 == VcpuReport(0, 0x2000, "spin+0x0", True, 0, 1.0, "stuck", rip_before=0x2000)
    assert r1 == VcpuReport(1, 0x3000, None, False, 40, 1.0, "slow")
    assert r2 == VcpuReport(2, None, None, True, 0, 1.0, "stuck")


def test_a_failing_symbol_lookup_costs_only_the_symbol() -> None:
    w = ProgressWatch([0])
    w.mark(0.0)
    w.mark_stop(1.0)

    def broken(addr: int) -> str | None:
        raise OSError("gone")

    [r] = w.reports({0: 0x10}, broken)
    assert (r.rip, r.symbol) == (0x10, None)


def test_want_rips_asks_every_vcpu_once() -> None:
    w = ProgressWatch([0, 1])
    w.want_rips()
    assert all(w.vcpu(i).rip_due for i in (0, 1))


def test_kernel_guest_entries_tell_a_vcpu_that_never_reached_the_guest() -> None:
    spinning = VcpuReport(0, 0x100013, "spin+0x0", True, 0, 1.0, "stuck", guest_entries=1444)
    never = VcpuReport(0, 0x1000000, "startup_64+0x0", True, 0, 1.0, "stuck", guest_entries=0)
    assert not spinning.never_entered and never.never_entered
    assert spinning.line().endswith("; KVM entered the guest 1444 times")
    assert never.line().endswith("; KVM entered the guest 0 times (the host kernel is not running this vCPU: "
                                 "it never reached the guest)")
    log = "".join(f"pyvmm: {line}\n" for line in report_lines([spinning, never], None))
    assert [r.guest_entries for r in parse_report(log)] == [1444, 0]


def test_kernel_counters_are_windowed_like_the_exits() -> None:
    watch = ProgressWatch([0])
    entries = iter([100, 100, 100])
    watch.vcpu(0).kernel_entries = lambda: next(entries)
    watch.mark(10.0)
    watch.mark(10.5)
    watch.mark_stop(11.0)
    (r,) = watch.reports({0: 0x1000000}, None)
    assert r.guest_entries == 0 and r.window_s == 1.0
