/*
 * UART transmit for the coalesced-PIO tests (tests/kvm/test_coalesced_pio.py): reads N and a mode from
 * PORT_IN (two 32-bit reads), then writes N bytes, byte i = i & 0xff, to COM1's THR and exits with
 * EXIT_OK.  Mode bits:
 *   MODE_POLL  read LSR before each byte until THRE is set, as Linux's 8250 console does
 *   MODE_DLAB  first set the divisor latch the way a driver does: LCR = DLAB|8N1, DLL = 1 through the THR
 *              port, LCR = 8N1 (a coalesced write that must reach the UART before the LCR write)
 *   MODE_WAIT  after the bytes, read PORT_IN until it returns non-zero (the test answers once the host
 *              has seen every byte: the bytes must arrive without another exit on the UART)
 */
	.include "common.inc"

	.equ UART_LCR, COM1 + 3
	.equ UART_LSR, COM1 + 5
	.equ LSR_THRE, 0x20
	.equ MODE_POLL, 1
	.equ MODE_DLAB, 2
	.equ MODE_WAIT, 4

	.globl _start
_start:
	mov $PORT_IN, %dx
	inl %dx, %eax
	mov %eax, %r8d			/* N */
	inl %dx, %eax
	mov %eax, %r9d			/* mode */

	test $MODE_DLAB, %r9d
	jz 1f
	mov $UART_LCR, %dx
	mov $0x83, %al			/* DLAB | 8N1 */
	outb %al, %dx
	mov $COM1, %dx
	mov $0x01, %al			/* DLL = 1 (115200 baud) */
	outb %al, %dx
	mov $UART_LCR, %dx
	mov $0x03, %al			/* 8N1, DLAB clear */
	outb %al, %dx

1:	xor %ecx, %ecx
next:	cmp %r8d, %ecx
	jae done
	test $MODE_POLL, %r9d
	jz send
	mov $UART_LSR, %dx
poll:	inb %dx, %al
	test $LSR_THRE, %al
	jz poll
send:	mov %cl, %al
	mov $COM1, %dx
	outb %al, %dx
	inc %ecx
	jmp next

done:	test $MODE_WAIT, %r9d
	jz 2f
	mov $PORT_IN, %dx
wait:	inl %dx, %eax
	test %eax, %eax
	jz wait
2:	debug_exit EXIT_OK
