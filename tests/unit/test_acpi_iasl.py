"""The ACPI tables through a real tool: ACPICA's ``iasl -d`` (Debian acpica-tools) must disassemble each
SDT without errors, and the disassembly must show what a guest relies on.  The RSDP is not an SDT
(iasl's file loader wants the 36-byte header), so it is checked by test_acpi_tables.py alone."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import layout
from pyvmm.arch.x86_64.acpi import tables as t

IASL = shutil.which("iasl")
pytestmark = pytest.mark.skipif(IASL is None, reason="iasl not installed (apt-get install acpica-tools)")


@pytest.fixture(scope="module")
def disassembly(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("acpi")
    virtio = []
    for i in range(2):
        base, irq = layout.virtio_mmio_slot(i)
        virtio.append(t.VirtioMmioDevice(base, layout.VIRTIO_MMIO_SIZE, irq))
    acpi = t.build(2, virtio, pvpanic_port=layout.PVPANIC_PORT)
    out = {}
    for sig, (_, data) in acpi.tables.items():
        if sig == "RSDP":
            continue
        src = tmp / f"{sig.lower()}.dat"
        src.write_bytes(data)
        assert IASL is not None
        proc = subprocess.run([IASL, "-d", src.name], cwd=tmp, capture_output=True, text=True, timeout=60)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"iasl -d {sig} failed:\n{log}"
        assert not re.search(r"\b(Error|Warning)\b", log), f"iasl -d {sig}:\n{log}"
        dsl = Path(tmp / f"{sig.lower()}.dsl").read_text()
        assert not re.search(r"\*\*\*\*.*(Invalid|Error|incorrect)", dsl, re.I), dsl
        out[sig] = dsl
    return out


def test_all_tables_disassemble(disassembly: dict[str, str]) -> None:
    assert sorted(disassembly) == ["APIC", "DSDT", "FACP", "XSDT"]


def test_dsdt(disassembly: dict[str, str]) -> None:
    dsl = disassembly["DSDT"]
    assert dsl.count('Name (_HID, "LNRO0005")') == 2
    assert 'EisaId ("PNP0501")' in dsl
    assert "Memory32Fixed (ReadWrite,\n                    0xD0000000," in dsl
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n                {\n" \
           "                    0x00000005," in dsl
    assert "IRQNoFlags ()\n                    {4}" in dsl
    assert "Name (\\_S5, Package (0x02)" in dsl
    # pvpanic as Linux's pvpanic-mmio driver matches it: _HID "QEMU0001", one I/O port
    assert re.search(r'Device \(PEVT\)\s*\{\s*Name \(_HID, "QEMU0001"\)', dsl), dsl
    assert "IO (Decode16,\n                    0x0505,             // Range Minimum\n" \
           "                    0x0505,             // Range Maximum\n" \
           "                    0x01,               // Alignment\n" \
           "                    0x01,               // Length" in dsl


def test_madt(disassembly: dict[str, str]) -> None:
    dsl = disassembly["APIC"]
    assert dsl.count("[Processor Local APIC]") == 2
    assert re.search(r"Local Apic ID : 01", dsl)
    assert "[I/O APIC]" in dsl and "Address : FEC00000" in dsl
    assert dsl.count("[Interrupt Source Override]") == 4
    assert "[Local APIC NMI]" in dsl


def test_fadt(disassembly: dict[str, str]) -> None:
    dsl = disassembly["FACP"]
    assert re.search(r"Hardware Reduced \(V5\) : 1", dsl)
    assert "Sleep Control Register" in dsl and "Sleep Status Register" in dsl
    assert re.search(r"Address : 0000000000000600", dsl)
