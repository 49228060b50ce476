"""The Intel MultiProcessor table (MP spec 1.4, chapter 4): how a kernel without ACPI finds the vCPUs,
the I/O APIC and the ISA interrupt wiring.

Layout (MP spec 1.4):
- 4.1 MP Floating Pointer Structure (16 bytes, 16-byte aligned) in 0xf0000-0xfffff, one of the places
  Linux's ``smp_scan_config`` searches (arch/x86/kernel/mpparse.c); it points at
- 4.2 MP Configuration Table Header (44 bytes), followed by the base table entries, in the order 4.3
  asks for: Processor (20 bytes, 4.3.1), Bus (8, 4.3.2), I/O APIC (8, 4.3.3), I/O Interrupt Assignment
  (8, 4.3.4), Local Interrupt Assignment (8, 4.3.5).

Interrupt wiring follows what KVM really does, not a PC chipset: KVM's default GSI routing
(arch/x86/kvm/irq_comm.c, ``default_routing``) sends GSI n of 0-15 to PIC pin n *and* IOAPIC pin n, and
the in-kernel PIT raises GSI 0, so ISA IRQ n is IOAPIC pin n (IRQ 0 included; QEMU's "IRQ0 -> pin 2"
needs QEMU's own routing table).  ISA interrupts are edge-triggered, active high ("conforms to bus").
"""

from __future__ import annotations

import struct

from pyvmm.arch.x86_64 import layout
from pyvmm.memory import GuestMemory

# 4.1 / 4.2 signatures and the spec revision we follow
FLOATING_SIGNATURE = b"_MP_"
CONFIG_SIGNATURE = b"PCMP"
SPEC_REV_1_4 = 4
OEM_ID = b"PYVMM   "  # 8 bytes
PRODUCT_ID = b"PYVMM MPTABL"  # 12 bytes

# 4.3 entry types
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4
# 4.3.1 CPU flags
CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
# 4.3.3 I/O APIC flags
IOAPIC_USABLE = 1 << 0
# 4.3.4 table 4-7 interrupt types; flags 0 = polarity and trigger "conform to the bus" (ISA: edge, high)
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
MP_IRQ_DEFAULT = 0

BUS_ISA_ID = 0
BUS_ISA_TYPE = b"ISA   "  # table 4-8, 6 bytes padded with blanks
LAPIC_VERSION = 0x14  # an integrated xAPIC (SDM vol. 3 10.4.8: 0x1X); what KVM's LAPIC reports
IOAPIC_VERSION = 0x11  # KVM's IOAPIC (arch/x86/kvm/ioapic.h IOAPIC_VERSION_ID)
ALL_LAPICS = 0xFF  # 4.3.5: destination "all local APICs"
ISA_IRQS = 16

FLOATING_SIZE = 16
HEADER_SIZE = 44


def ioapic_id(cpu_count: int) -> int:
    """The I/O APIC's id: the first after the local APIC ids (0..cpu_count-1), as MP spec 4.3.3
    examples and Firecracker do; the MADT uses the same id.  I/O APIC ids are 8 bits: past 254 vCPUs
    (x2APIC territory, MADT only) it falls back to 0."""
    return cpu_count if cpu_count < 0xFF else 0


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to 0 mod 256 (MP spec 4.1 / 4.2 CHECKSUM)."""
    return (-sum(data)) & 0xFF


def _with_checksum(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] = 0
    b[offset] = checksum(bytes(b))
    return bytes(b)


def cpu_signature(family: int = 6, model: int = 0, stepping: int = 0) -> int:
    """4.3.1 CPU SIGNATURE: stepping, model, family as in CPUID leaf 1 EAX."""
    return (family << 8) | (model << 4) | stepping


def _processor(apic_id: int, bsp: bool) -> bytes:
    flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if bsp else 0)
    # type, APIC id, APIC version, flags, signature, feature flags (FPU | APIC), 8 reserved bytes
    return struct.pack("<BBBBII8x", MP_PROCESSOR, apic_id, LAPIC_VERSION, flags, cpu_signature(),
                       (1 << 0) | (1 << 9))


def _bus() -> bytes:
    return struct.pack("<BB6s", MP_BUS, BUS_ISA_ID, BUS_ISA_TYPE)


def _ioapic(ident: int) -> bytes:
    return struct.pack("<BBBBI", MP_IOAPIC, ident, IOAPIC_VERSION, IOAPIC_USABLE, layout.IOAPIC_ADDR)


def _intsrc(irqtype: int, src_irq: int, dst_apic: int, dst_pin: int) -> bytes:
    return struct.pack("<BBHBBBB", MP_INTSRC, irqtype, MP_IRQ_DEFAULT, BUS_ISA_ID, src_irq, dst_apic, dst_pin)


def _lintsrc(irqtype: int, dst_apic: int, lint: int) -> bytes:
    return struct.pack("<BBHBBBB", MP_LINTSRC, irqtype, MP_IRQ_DEFAULT, BUS_ISA_ID, 0, dst_apic, lint)


def build(cpu_count: int, base: int = layout.MPTABLE_START) -> bytes:
    """The floating pointer at ``base`` followed by the configuration table, as one blob."""
    if not 1 <= cpu_count <= 254:
        raise ValueError(f"MP table: bad cpu count {cpu_count} (xAPIC ids are 8 bits, 0xff is broadcast)")
    if base % 16:
        raise ValueError("MP floating pointer must be 16-byte aligned (MP spec 4.1)")
    io_id = ioapic_id(cpu_count)
    entries = [_processor(i, bsp=(i == 0)) for i in range(cpu_count)]
    entries.append(_bus())
    entries.append(_ioapic(io_id))
    # 4.3.4: ISA IRQ n -> IOAPIC pin n (KVM's default routing, see the module docstring).  IRQ 2 is the
    # PIC cascade and never raised; listed anyway so every pin 0-15 has an owner.
    entries += [_intsrc(MP_INT, irq, io_id, irq) for irq in range(ISA_IRQS)]
    # 4.3.5: LINT0 is the PIC (virtual wire, ExtINT), LINT1 is NMI - what cpu.setup_lapic programs.
    entries.append(_lintsrc(MP_EXTINT, ALL_LAPICS, 0))
    entries.append(_lintsrc(MP_NMI, ALL_LAPICS, 1))
    body = b"".join(entries)
    config_addr = base + FLOATING_SIZE
    header = struct.pack(
        "<4sHBB8s12sIHHIHBB",
        CONFIG_SIGNATURE, HEADER_SIZE + len(body), SPEC_REV_1_4, 0, OEM_ID, PRODUCT_ID,
        0, 0,  # no OEM table
        len(entries), layout.LAPIC_ADDR,
        0, 0, 0,  # no extended table, its checksum, reserved
    )
    config = _with_checksum(header + body, 7)
    # 4.1: pointer, length in 16-byte paragraphs (1), revision, checksum, feature bytes 1-5 all 0:
    # feature 1 = 0 means "a configuration table is present"; feature 2 bit 7 (IMCRP) = 0 means virtual
    # wire mode, no IMCR to program.
    floating = _with_checksum(struct.pack("<4sIBBB5x", FLOATING_SIGNATURE, config_addr, 1, SPEC_REV_1_4, 0), 10)
    return floating + config


def write(mem: GuestMemory, cpu_count: int) -> int:
    """Write the MP table into the BIOS area; returns its size."""
    blob = build(cpu_count)
    if layout.MPTABLE_START + len(blob) > layout.BIOS_AREA_END:
        raise ValueError(f"MP table of {len(blob)} bytes does not fit the BIOS area")
    mem.write(layout.MPTABLE_START, blob)
    return len(blob)
