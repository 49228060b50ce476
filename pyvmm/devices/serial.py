"""A 16550A UART, enough for Linux's 8250 driver: console output, interrupt-driven input.

Register map and bits from the National Semiconductor PC16550D data sheet (and Linux's
include/uapi/linux/serial_reg.h, whose names we use).  Transmission is instantaneous: THR writes go
straight to the output sink, so LSR always reports THRE|TEMT and no transmit FIFO is modelled.  The
receive FIFO holds up to 64 bytes of console input.

Interrupts are edges on an :class:`~pyvmm.interrupt.IrqLine` (ISA IRQ 4 is edge-triggered): the line
is triggered whenever the highest-priority pending interrupt (IIR) goes from "none" to something.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from pyvmm.interrupt import IrqLine

# register offsets (serial_reg.h)
UART_RX = 0  # in: receive buffer (DLAB=0)
UART_TX = 0  # out: transmit holding (DLAB=0)
UART_DLL = 0  # divisor latch low (DLAB=1)
UART_IER = 1
UART_DLM = 1  # divisor latch high (DLAB=1)
UART_IIR = 2  # in
UART_FCR = 2  # out
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_IER_RDI = 0x01
UART_IER_THRI = 0x02
UART_IER_RLSI = 0x04
UART_IER_MSI = 0x08

UART_IIR_NO_INT = 0x01
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_FIFO_ENABLED = 0xC0

UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02

UART_LCR_DLAB = 0x80

UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10

UART_LSR_DR = 0x01
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
_LSR_IDLE = UART_LSR_THRE | UART_LSR_TEMT  # transmission is instant: always ready for the next byte

UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80

RX_FIFO_SIZE = 64
_BYTE = [bytes((i,)) for i in range(256)]  # one transmitted byte, without making a bytes object per write


class Serial16550:
    """One UART.  ``output`` receives every transmitted byte; ``feed`` queues console input."""

    def __init__(self, irq: IrqLine, output: Callable[[bytes], None]) -> None:
        self._irq = irq
        self._output = output
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = UART_MCR_OUT2
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.fifo_enabled = False
        self._thr_empty_pending = False  # THRE interrupt latched until IIR read or THR write
        self._irq_pending = False

    # -- host side ----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Queue console input; return how many bytes were accepted (the FIFO holds 64)."""
        with self._lock:
            room = RX_FIFO_SIZE - len(self._rx)
            accepted = data[:room]
            self._rx.extend(accepted)
            fire = self._update_irq()
        if fire:
            self._irq.trigger()
        return len(accepted)

    @property
    def rx_room(self) -> int:
        return RX_FIFO_SIZE - len(self._rx)

    # -- guest side (BusDevice) -----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            fire = self._update_irq()
        if fire:
            self._irq.trigger()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        out: bytes | None = None
        with self._lock:
            if self._write(offset, value):
                out = _BYTE[value]
            fire = self._update_irq()
        if out is not None and not self.mcr & UART_MCR_LOOP:
            self._output(out)
        if fire:
            self._irq.trigger()

    # -- cheaper paths for the vCPU loop: the registers a console write hammers -----------------------
    def register_reader(self, offset: int) -> Callable[[int], int] | None:
        """LSR, which Linux's console polls before every byte, read without the lock (the dispatch table's
        reader, :class:`pyvmm.bus.FastRegisters`): the read has no side effect here (no error bits are
        modelled, IIR and the interrupt line stay as they are), and its one variable bit, DR, is one test
        of the RX FIFO (atomic under the GIL).  Other registers: None (``read``)."""
        return self._read_lsr if offset == UART_LSR else None

    def _read_lsr(self, size: int) -> int:
        return _LSR_IDLE | UART_LSR_DR if self._rx else _LSR_IDLE

    def ordered_reader(self, offset: int, replay: Callable[[], None]) -> Callable[[int], int] | None:
        """For a VMM that queues THR writes (KVM's coalesced ring, :mod:`pyvmm.coalescing`): a reader of
        ``offset`` that calls ``replay`` (deliver the queued writes) itself before any read those writes
        could change, or None: replay before every read.  Only LSR can do without them: transmission is
        instant, so THRE and TEMT never change, and a transmitted byte reaches the RX FIFO (DR) only in
        loopback.  One call per LSR poll, lock-free as :meth:`register_reader`."""
        if offset != UART_LSR:
            return None

        def read_lsr(size: int) -> int:
            if self.mcr & UART_MCR_LOOP:
                replay()
            return _LSR_IDLE | UART_LSR_DR if self._rx else _LSR_IDLE

        return read_lsr

    def write_run(self, offset: int, size: int, values: list[int]) -> None:
        """Several writes to one register, as ``write`` one after another would make them: a run of THR
        bytes (a console line replayed from KVM's ring) goes to the output in one call.  No read comes
        between them, so one interrupt update covers them all (THRE latches on the first)."""
        with self._lock:
            bulk = offset == UART_TX and not self.lcr & UART_LCR_DLAB and not self.mcr & UART_MCR_LOOP
            if bulk:
                self._thr_empty_pending = True
                fire = self._update_irq()
        if not bulk:
            for value in values:
                self.write(offset, size, value)
            return
        self._output(bytes(values) if size == 1 else bytes(v & 0xFF for v in values))
        if fire:
            self._irq.trigger()

    def _read(self, offset: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_RX:
            if dlab:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if offset == UART_IER:
            return self.dlm if dlab else self.ier
        if offset == UART_IIR:
            iir = self._iir()
            if iir == UART_IIR_THRI:
                self._thr_empty_pending = False  # reading IIR clears a THRE interrupt (16550D data sheet)
            return iir | (UART_IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == UART_LCR:
            return self.lcr
        if offset == UART_MCR:
            return self.mcr
        if offset == UART_LSR:
            return self._read_lsr(1)
        if offset == UART_MSR:
            if self.mcr & UART_MCR_LOOP:
                # loopback: modem outputs appear on the modem inputs (the 8250 driver's probe checks this)
                m = self.mcr
                return ((m & UART_MCR_RTS) << 3) | ((m & UART_MCR_DTR) << 5) | ((m & UART_MCR_OUT1) << 4) | (
                    (m & UART_MCR_OUT2) << 4
                )
            return UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        if offset == UART_SCR:
            return self.scr
        return 0

    def _write(self, offset: int, value: int) -> bool:
        """Apply a register write; return True if ``value`` was a byte transmitted."""
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_TX:
            if dlab:
                self.dll = value
                return False
            if self.mcr & UART_MCR_LOOP and len(self._rx) < RX_FIFO_SIZE:
                self._rx.append(value)
            self._thr_empty_pending = True  # sent at once: THR is empty again
            return True
        if offset == UART_IER:
            if dlab:
                self.dlm = value
            else:
                was_thri = self.ier & UART_IER_THRI
                self.ier = value & 0x0F
                if self.ier & UART_IER_THRI and not was_thri:
                    self._thr_empty_pending = True  # enabling THRI with an empty THR interrupts at once
        elif offset == UART_FCR:
            self.fifo_enabled = bool(value & UART_FCR_ENABLE_FIFO)
            if value & UART_FCR_CLEAR_RCVR:
                self._rx.clear()
        elif offset == UART_LCR:
            self.lcr = value
        elif offset == UART_MCR:
            self.mcr = value & 0x1F
        elif offset == UART_SCR:
            self.scr = value
        return False

    def _iir(self) -> int:
        if self.ier & UART_IER_RDI and self._rx:
            return UART_IIR_RDI
        if self.ier & UART_IER_THRI and self._thr_empty_pending:
            return UART_IIR_THRI
        return UART_IIR_NO_INT

    def _update_irq(self) -> bool:
        """Recompute the interrupt output; return True on a rising edge (OUT2 gates it on a PC)."""
        pending = self._iir() != UART_IIR_NO_INT and bool(self.mcr & UART_MCR_OUT2)
        rising = pending and not self._irq_pending
        self._irq_pending = pending
        return rising
