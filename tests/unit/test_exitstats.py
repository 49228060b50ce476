"""Exit statistics (``pyvmm run --stats``): the process start time and the table."""

from __future__ import annotations

from pyvmm.exitstats import ExitCounter, ExitStats, parse_start_ticks, process_age_s


def test_start_time_is_read_past_a_command_name_with_parentheses() -> None:
    # /proc/PID/stat: "pid (comm) state ppid ..." and starttime is field 22 (proc(5)); comm may hold ") ".
    fields = ["S"] + [str(i) for i in range(4, 22)] + ["987654"] + ["0"] * 30
    line = "4242 (py) (vmm) " + " ".join(fields)
    assert parse_start_ticks(line) == 987654


def test_this_process_is_younger_than_the_machine() -> None:
    age = process_age_s()
    assert age is not None and 0 <= age < 24 * 3600 * 365


def test_table_rows_and_totals() -> None:
    c = ExitCounter()
    c.pio[0x3FD << 1] = [19500, 0.39]  # read
    c.pio[0x3F8 << 1 | 1] = [19400, 0.58]  # write
    c.mmio[0xD000_0050 << 1 | 1] = [12, 0.001]
    c.other[10] = [3, 0.0003]  # KVM_EXIT_INTR
    c.in_kvm_s = 7.5
    st = ExitStats.collect([c], wall_s=10.0, start_to_first_run_s=0.42, coalesced={"pio 0x3f8 write": 19000})
    assert st.exits == 19500 + 19400 + 12 + 3
    assert st.count("pio", 0x3FD, "read") == 19500
    assert st.count("intr") == 3
    assert [r.label for r in st.rows][:2] == ["pio 0x3fd read", "pio 0x3f8 write"]
    lines = st.table()
    text = "\n".join(lines)
    for needle in ("pio 0x3fd read", "19500", "mmio 0xd0000050 write", "intr", "in KVM_RUN 7.50 s",
                   "process start -> first KVM_RUN 0.42 s", "coalesced", "19000"):
        assert needle in text, (needle, text)
    assert len(lines) <= 12
