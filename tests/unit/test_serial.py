"""The 16550 model as Linux's 8250 driver sees it (PC16550D data sheet register semantics)."""

from __future__ import annotations

import pytest

from pyvmm.devices import serial as s
from pyvmm.interrupt import CountingIrq


def make() -> tuple[s.Serial16550, CountingIrq, bytearray]:
    irq = CountingIrq()
    out = bytearray()
    return s.Serial16550(irq, out.extend), irq, out


def test_transmit_goes_to_output_and_lsr_is_always_ready() -> None:
    uart, _, out = make()
    for b in b"hello":
        assert uart.read(s.UART_LSR, 1) & s.UART_LSR_THRE
        uart.write(s.UART_TX, 1, b)
    assert out == b"hello"
    assert uart.read(s.UART_LSR, 1) & (s.UART_LSR_THRE | s.UART_LSR_TEMT) == 0x60


def test_divisor_latch_does_not_transmit() -> None:
    uart, _, out = make()
    uart.write(s.UART_LCR, 1, s.UART_LCR_DLAB | 3)
    uart.write(s.UART_DLL, 1, 1)
    uart.write(s.UART_DLM, 1, 0)
    assert uart.read(s.UART_DLL, 1) == 1
    uart.write(s.UART_LCR, 1, 3)
    assert out == b""


def test_receive_interrupt_edge_and_fifo() -> None:
    uart, irq, _ = make()
    uart.write(s.UART_MCR, 1, s.UART_MCR_OUT2)
    uart.write(s.UART_IER, 1, s.UART_IER_RDI)
    assert irq.count == 0
    assert uart.feed(b"ab") == 2
    assert irq.count == 1  # one edge for the transition to pending
    assert uart.read(s.UART_IIR, 1) & 0x0F == s.UART_IIR_RDI
    assert uart.read(s.UART_LSR, 1) & s.UART_LSR_DR
    assert uart.read(s.UART_RX, 1) == ord("a")
    assert uart.read(s.UART_RX, 1) == ord("b")
    assert not uart.read(s.UART_LSR, 1) & s.UART_LSR_DR
    assert uart.read(s.UART_IIR, 1) & 0x0F == s.UART_IIR_NO_INT
    uart.feed(b"c")
    assert irq.count == 2


def test_fifo_is_bounded() -> None:
    uart, _, _ = make()
    assert uart.feed(bytes(100)) == s.RX_FIFO_SIZE
    assert uart.rx_room == 0


def test_thre_interrupt_on_enable_and_cleared_by_iir_read() -> None:
    uart, irq, _ = make()
    uart.write(s.UART_MCR, 1, s.UART_MCR_OUT2)
    uart.write(s.UART_IER, 1, s.UART_IER_THRI)
    assert irq.count == 1
    assert uart.read(s.UART_IIR, 1) & 0x0F == s.UART_IIR_THRI
    assert uart.read(s.UART_IIR, 1) & 0x0F == s.UART_IIR_NO_INT
    uart.write(s.UART_TX, 1, ord("x"))
    assert irq.count == 2


def test_out2_gates_the_interrupt() -> None:
    uart, irq, _ = make()
    uart.write(s.UART_MCR, 1, 0)
    uart.write(s.UART_IER, 1, s.UART_IER_RDI)
    uart.feed(b"z")
    assert irq.count == 0


def test_loopback_as_the_8250_probe_checks_it() -> None:
    uart, _, out = make()
    uart.write(s.UART_MCR, 1, s.UART_MCR_LOOP | 0x0A)  # serial8250 autoconfig: LOOP | OUT2 | RTS
    assert uart.read(s.UART_MSR, 1) & 0xF0 == 0x90
    uart.write(s.UART_TX, 1, 0x55)
    assert out == b""  # looped back, not transmitted
    assert uart.read(s.UART_RX, 1) == 0x55


def test_fifo_enable_reported_in_iir_and_scratch() -> None:
    uart, _, _ = make()
    uart.write(s.UART_FCR, 1, s.UART_FCR_ENABLE_FIFO)
    assert uart.read(s.UART_IIR, 1) & 0xC0 == 0xC0  # a 16550A
    uart.write(s.UART_SCR, 1, 0xA5)
    assert uart.read(s.UART_SCR, 1) == 0xA5


def test_the_lsr_fast_reader_reads_as_read_does() -> None:
    uart, irq, _ = make()
    fast = uart.register_reader(s.UART_LSR)
    assert fast is not None
    assert all(uart.register_reader(off) is None for off in range(8) if off != s.UART_LSR)
    uart.write(s.UART_MCR, 1, s.UART_MCR_OUT2)
    uart.write(s.UART_IER, 1, s.UART_IER_RDI)
    assert fast(1) == uart.read(s.UART_LSR, 1) == 0x60
    uart.feed(b"k")
    assert fast(1) == uart.read(s.UART_LSR, 1) == 0x61
    uart.read(s.UART_RX, 1)
    assert fast(1) == 0x60 and irq.count == 1


def test_the_ordered_lsr_reader_replays_queued_writes_only_in_loopback() -> None:
    uart, _, _ = make()
    replays: list[int] = []
    lsr = uart.ordered_reader(s.UART_LSR, lambda: replays.append(1))
    assert lsr is not None
    assert all(uart.ordered_reader(off, lambda: None) is None for off in range(8) if off != s.UART_LSR)
    assert lsr(1) == 0x60 and replays == []
    uart.feed(b"q")
    assert lsr(1) == 0x61 and replays == []
    uart.write(s.UART_MCR, 1, s.UART_MCR_LOOP)
    assert lsr(1) == 0x61 and replays == [1]  # a queued THR byte would set DR: delivered first


@pytest.mark.parametrize("lcr, mcr", [(0x03, s.UART_MCR_OUT2), (0x83, s.UART_MCR_OUT2),
                                      (0x03, s.UART_MCR_OUT2 | s.UART_MCR_LOOP)],
                         ids=["transmit", "divisor", "loopback"])
@pytest.mark.parametrize("ier", [0, s.UART_IER_THRI])
def test_a_run_of_writes_is_the_writes_one_by_one(lcr: int, mcr: int, ier: int) -> None:
    data = list(b"line of text\r\n")
    seen = []
    for use_run in (False, True):
        uart, irq, out = make()
        uart.write(s.UART_MCR, 1, mcr)
        uart.write(s.UART_IER, 1, ier)
        uart.read(s.UART_IIR, 1)  # clear the THRE interrupt enabling THRI raised
        uart.write(s.UART_LCR, 1, lcr)
        if use_run:
            uart.write_run(s.UART_TX, 1, data)
        else:
            for b in data:
                uart.write(s.UART_TX, 1, b)
        uart.write(s.UART_LCR, 1, lcr & 0x7F)
        seen.append((bytes(out), irq.count, uart.dll, [uart.read(off, 1) for off in range(1, 8)],
                     [uart.read(s.UART_RX, 1) for _ in range(len(data))]))
    assert seen[0] == seen[1]
