"""The static ACPI tables of the x86_64 machine: RSDP, XSDT, FADT, MADT and DSDT (ACPI 6.5).

- RSDP: 5.2.5.3 "Root System Description Pointer (RSDP) Structure", revision 2 (36 bytes, checksum over
  the first 20 bytes, extended checksum over all 36); 16-byte aligned (5.2.5.1).
- Every other table starts with the 36-byte header of 5.2.6 "System Description Table Header".
- XSDT: 5.2.8, 64-bit pointers to the FADT and the MADT.
- FADT: 5.2.9 Table 5.9, revision 6 (276 bytes) with HW_REDUCED_ACPI (5.2.9.3 fixed feature flags):
  no PM1/GPE/PM timer blocks, no SCI, no SMI command port.  Power-off goes through SLEEP_CONTROL_REG and
  SLEEP_STATUS_REG (4.8.3.7 / 7.4.2 \\_S5) on our I/O ports; reset through RESET_REG = the i8042.
  Generic Address Structures: 5.2.3.2.
- MADT: 5.2.12: one Processor Local APIC (5.2.12.2) per vCPU (Processor Local x2APIC, 5.2.12.12, for
  ids of 255 and up), the I/O APIC (5.2.12.3), Interrupt Source Overrides (5.2.12.5) and a Local APIC
  NMI (5.2.12.7) on LINT1.
- DSDT: 5.2.11.1, AML (see :mod:`.aml`): \\_SB.COM1 (PNP0501), \\_SB.PEVT (QEMU0001, pvpanic), one LNRO0005 device per virtio-mmio
  window (the id Linux's drivers/virtio/virtio_mmio.c matches), and \\_S5.

Interrupts match what KVM does with our irqfds: KVM's default GSI routing sends GSI n (0-15) to IOAPIC
pin n, so every ISA IRQ is identity-mapped (no "IRQ0 -> GSI 2" as on a PC chipset, which needs QEMU's
routing table); an irqfd pulses its GSI (set 1, set 0), so virtio interrupts are edge-triggered, active
high.  The overrides say so explicitly: without polarity/trigger flags Linux would take an override of
IRQ 0 for the SCI (FADT.SCI_INT is 0 here) and make it level/low (arch/x86/kernel/acpi/boot.c).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyvmm.arch.x86_64 import layout, mptable
from pyvmm.arch.x86_64.acpi import aml
from pyvmm.devices import pvpanic
from pyvmm.memory import GuestMemory
from pyvmm.record import field, record
from pyvmm.statictypes import NamedTuple

OEM_ID = b"PYVMM "  # 6 bytes
OEM_TABLE_ID = b"PYVMM   "  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1
HEADER_SIZE = 36
RSDP_SIZE = 36
TABLE_ALIGN = 16

# 5.2.9 FADT
FADT_REVISION = 6
FADT_MINOR_REVISION = 5  # ACPI 6.5
FADT_SIZE = 276
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_HW_REDUCED_ACPI = 1 << 20
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
HYPERVISOR_VENDOR = b"PYVMM\0\0\0"
# 5.2.3.2 Generic Address Structure: address space ids and access sizes
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
RESET_VALUE = 0xFE  # i8042 "pulse reset line" command, written to port 0x64
# 4.8.3.7 Sleep Control / Status registers (hardware-reduced ACPI)
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 5
WAK_STS = 1 << 7
S5_SLP_TYP = 5  # the value \_S5 hands the OS; our sleep-control device powers off on it

# 5.2.12 MADT
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0  # the 8259 pair exists (KVM's in-kernel PIC)
MADT_LAPIC = 0
MADT_IOAPIC = 1
MADT_ISO = 2
MADT_LAPIC_NMI = 4
MADT_X2APIC = 9
MADT_X2APIC_NMI = 10
LAPIC_ENABLED = 1 << 0
ALL_PROCESSORS_UID = 0xFF
ALL_PROCESSORS_X2UID = 0xFFFFFFFF
# 5.2.12.5 MPS INTI flags: polarity bits 1-0 (01 active high), trigger bits 3-2 (01 edge)
MPS_INTI_POLARITY_HIGH = 0x1
MPS_INTI_TRIGGER_EDGE = 0x1 << 2
ISA_BUS = 0
TIMER_IRQ = 0

DSDT_REVISION = 2  # 64-bit AML integers
XSDT_REVISION = 1


def checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _set_checksum(table: bytearray, offset: int, end: int | None = None) -> None:
    table[offset] = 0
    table[offset] = checksum(bytes(table[:end]))


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 5.2.6 header (length and checksum filled) + ``body``."""
    if len(signature) != 4:
        raise ValueError(f"bad table signature {signature!r}")
    length = HEADER_SIZE + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION,
                         CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    _set_checksum(table, 9)
    return bytes(table)


def rsdp(xsdt_addr: int) -> bytes:
    """5.2.5.3: revision 2; RsdtAddress 0 (there is no RSDT: ACPI 2.0+ OSes use the XSDT)."""
    raw = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_SIZE, xsdt_addr, 0))
    _set_checksum(raw, 8, 20)
    _set_checksum(raw, 32)
    return bytes(raw)


def xsdt(entries: Sequence[int]) -> bytes:
    return sdt(b"XSDT", XSDT_REVISION, struct.pack(f"<{len(entries)}Q", *entries))


def gas(space: int, bit_width: int, address: int, access_size: int, bit_offset: int = 0) -> bytes:
    """5.2.3.2 Generic Address Structure (12 bytes)."""
    return struct.pack("<BBBBQ", space, bit_width, bit_offset, access_size, address)


def fadt(dsdt_addr: int) -> bytes:
    """5.2.9 Table 5.9, field by field (offsets in the comments are from the start of the table)."""
    no_gas = bytes(12)
    body = b"".join([
        struct.pack("<II", 0, 0),  # 36 FIRMWARE_CTRL (no FACS: 5.2.10 is optional when HW-reduced), 40 DSDT
        struct.pack("<BBH", 0, 0, 0),  # 44 reserved, 45 Preferred_PM_Profile (unspecified), 46 SCI_INT
        struct.pack("<IBBBB", 0, 0, 0, 0, 0),  # 48 SMI_CMD, 52 ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        bytes(32),  # 56-87: PM1a/b_EVT_BLK, PM1a/b_CNT_BLK, PM2_CNT_BLK, PM_TMR_BLK, GPE0/1_BLK
        bytes(8),  # 88-95: PM1_EVT_LEN .. GPE1_BASE, CST_CNT
        struct.pack("<HHHH", 0, 0, 0, 0),  # 96 P_LVL2_LAT, P_LVL3_LAT, FLUSH_SIZE, FLUSH_STRIDE
        struct.pack("<BBBBB", 0, 0, 0, 0, 0),  # 104 DUTY_OFFSET, DUTY_WIDTH, DAY_ALRM, MON_ALRM, CENTURY
        struct.pack("<HB", IAPC_BOOT_ARCH_VGA_NOT_PRESENT, 0),  # 109 IAPC_BOOT_ARCH, 111 reserved
        struct.pack("<I", FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP),  # 112 Flags
        gas(GAS_SYSTEM_IO, 8, layout.I8042_CMD_PORT, GAS_ACCESS_BYTE),  # 116 RESET_REG
        struct.pack("<BHB", RESET_VALUE, 0, FADT_MINOR_REVISION),  # 128 RESET_VALUE, ARM_BOOT_ARCH, minor
        struct.pack("<QQ", 0, dsdt_addr),  # 132 X_FIRMWARE_CTRL, 140 X_DSDT (DSDT stays 0: 5.2.9 says so)
        no_gas * 8,  # 148-243: X_PM1a/b_EVT_BLK, X_PM1a/b_CNT_BLK, X_PM2_CNT_BLK, X_PM_TMR_BLK, X_GPE0/1_BLK
        gas(GAS_SYSTEM_IO, 8, layout.ACPI_SLEEP_CONTROL_PORT, GAS_ACCESS_BYTE),  # 244 SLEEP_CONTROL_REG
        gas(GAS_SYSTEM_IO, 8, layout.ACPI_SLEEP_STATUS_PORT, GAS_ACCESS_BYTE),  # 256 SLEEP_STATUS_REG
        HYPERVISOR_VENDOR,  # 268 Hypervisor Vendor Identity
    ])
    table = sdt(b"FACP", FADT_REVISION, body)
    assert len(table) == FADT_SIZE
    return table


def madt(cpu_count: int, isa_irqs: Sequence[int]) -> bytes:
    """5.2.12: LAPIC (or x2APIC) per vCPU with APIC id = UID = vCPU index, the I/O APIC at GSI 0, an
    identity override (edge, active high) for each ISA IRQ in ``isa_irqs``, and NMI on LINT1."""
    entries = []
    for i in range(cpu_count):
        if i < 0xFF:
            entries.append(struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, LAPIC_ENABLED))
        else:
            entries.append(struct.pack("<BBHIII", MADT_X2APIC, 16, 0, i, LAPIC_ENABLED, i))
    entries.append(struct.pack("<BBBBII", MADT_IOAPIC, 12, mptable.ioapic_id(cpu_count), 0, layout.IOAPIC_ADDR, 0))
    for irq in sorted(set(isa_irqs)):
        entries.append(struct.pack("<BBBBIH", MADT_ISO, 10, ISA_BUS, irq, irq,
                                   MPS_INTI_POLARITY_HIGH | MPS_INTI_TRIGGER_EDGE))
    # LINT1 is NMI on every processor (cpu.setup_lapic programs it so); flags 0 = conforms to the bus
    entries.append(struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS_UID, 0, 1))
    if cpu_count > 0xFF:
        entries.append(struct.pack("<BBHIB3x", MADT_X2APIC_NMI, 12, 0, ALL_PROCESSORS_X2UID, 1))
    body = struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT) + b"".join(entries)
    return sdt(b"APIC", MADT_REVISION, body)


class VirtioMmioDevice(NamedTuple):
    """One virtio-mmio window as the DSDT describes it."""

    base: int
    size: int
    irq: int


def virtio_device_aml(index: int, dev: VirtioMmioDevice) -> bytes:
    """Device (VRxx) { _HID "LNRO0005", _UID, _CCA 1, _CRS { Memory32Fixed, Interrupt (edge, high) } }."""
    return aml.device(
        f"VR{index:02X}",
        aml.name("_HID", aml.string("LNRO0005")),
        aml.name("_UID", aml.integer(index)),
        aml.name("_CCA", aml.integer(1)),  # 6.2.17: DMA is cache-coherent
        aml.name("_CRS", aml.resource_template(
            aml.memory32_fixed(dev.base, dev.size),
            aml.extended_interrupt(dev.irq, edge=True),
        )),
    )


def serial_aml() -> bytes:
    """Device (COM1) { _HID EISAID("PNP0501"), _UID 1, _CRS { IO (0x3f8, len 8), IRQNoFlags (4) } }."""
    return aml.device(
        "COM1",
        aml.name("_HID", aml.dword(aml.eisa_id("PNP0501"))),
        aml.name("_UID", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(
            aml.io(layout.COM1_PORT, layout.COM1_PORT, 1, 8),
            aml.irq_no_flags(layout.COM1_IRQ),
        )),
    )


def pvpanic_aml(port: int) -> bytes:
    """Device (PEVT) { _HID "QEMU0001", _CRS { IO (port, len 1) } }: the pvpanic device as QEMU's DSDT
    names it, which is what Linux's pvpanic-mmio driver matches (drivers/misc/pvpanic/pvpanic-mmio.c)."""
    return aml.device(
        "PEVT",
        aml.name("_HID", aml.string(pvpanic.ACPI_HID)),
        aml.name("_CRS", aml.resource_template(aml.io(port, port, 1, 1))),
    )


def dsdt(virtio: Sequence[VirtioMmioDevice], *, pvpanic_port: int | None = None) -> bytes:
    devices = [serial_aml(), *(virtio_device_aml(i, d) for i, d in enumerate(virtio))]
    if pvpanic_port is not None:
        devices.append(pvpanic_aml(pvpanic_port))
    body = aml.scope("\\_SB", *devices)
    # 7.4.2 \_S5: SLP_TYPa, SLP_TYPb.  With HW-reduced ACPI the OS writes SLP_TYPa | SLP_EN to
    # SLEEP_CONTROL_REG (ACPICA hwesleep.c); Linux offers ACPI power-off only when \_S5 exists.
    body += aml.name("\\_S5", aml.package(aml.integer(S5_SLP_TYP), aml.integer(0)))
    return sdt(b"DSDT", DSDT_REVISION, body)


def _align(n: int) -> int:
    return (n + TABLE_ALIGN - 1) & ~(TABLE_ALIGN - 1)


@record(frozen=False)
class AcpiTables:
    """The tables as placed in guest memory: ``blob`` goes at ``base``; ``tables`` maps each signature
    ("RSDP", "XSDT", "FACP", "APIC", "DSDT") to its guest address and bytes."""

    base: int
    blob: bytes
    tables: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    @property
    def rsdp_addr(self) -> int:
        return self.tables["RSDP"][0]


def build(cpu_count: int, virtio: Sequence[VirtioMmioDevice], *, base: int = layout.ACPI_TABLES_START,
          limit: int = layout.ACPI_TABLES_END, pvpanic_port: int | None = None) -> AcpiTables:
    """Lay out RSDP, XSDT, FADT, MADT and DSDT from ``base`` (each 16-byte aligned)."""
    if base % 16:
        raise ValueError("the RSDP must be 16-byte aligned (ACPI 6.5 5.2.5.1)")
    isa_irqs = [TIMER_IRQ, layout.COM1_IRQ, *(d.irq for d in virtio)]
    dsdt_b = dsdt(virtio, pvpanic_port=pvpanic_port)
    madt_b = madt(cpu_count, isa_irqs)
    rsdp_addr = base
    xsdt_addr = rsdp_addr + _align(RSDP_SIZE)
    fadt_addr = xsdt_addr + _align(HEADER_SIZE + 16)
    madt_addr = fadt_addr + _align(FADT_SIZE)
    dsdt_addr = madt_addr + _align(len(madt_b))
    end = dsdt_addr + len(dsdt_b)
    if end > limit:
        raise ValueError(f"ACPI tables end at {end:#x}, past {limit:#x}")
    placed = {
        "RSDP": (rsdp_addr, rsdp(xsdt_addr)),
        "XSDT": (xsdt_addr, xsdt([fadt_addr, madt_addr])),
        "FACP": (fadt_addr, fadt(dsdt_addr)),
        "APIC": (madt_addr, madt_b),
        "DSDT": (dsdt_addr, dsdt_b),
    }
    blob = bytearray(end - base)
    for addr, data in placed.values():
        blob[addr - base : addr - base + len(data)] = data
    return AcpiTables(base, bytes(blob), placed)


def write(mem: GuestMemory, cpu_count: int, virtio: Sequence[VirtioMmioDevice], *,
          pvpanic_port: int | None = None) -> AcpiTables:
    """Build the tables and copy them into the BIOS area of guest RAM (E820-reserved by build_e820)."""
    acpi = build(cpu_count, virtio, pvpanic_port=pvpanic_port)
    mem.write(acpi.base, acpi.blob)
    return acpi
