/*
 * MMIO both ways at MMIO_BASE, a page in the device hole (no RAM there, so every access exits):
 * writes of 1, 2, 4 and 8 bytes with known values, then reads of 1, 2, 4 and 8 bytes whose values
 * the test controls, each echoed (zero-extended to 64 bits) through PORT_REPORT.
 *
 * The address is built with movabs: as a disp32 or imm32 it would sign-extend to 0xffffffffd0000000.
 */
	.include "common.inc"

	.equ MMIO_BASE, 0xd0000000

	.globl _start
_start:
	movabs $MMIO_BASE, %rbx

	movb $0x11, 0x00(%rbx)
	movw $0x2233, 0x10(%rbx)
	movl $0x44556677, 0x20(%rbx)
	movabs $0x8899aabbccddeeff, %rax
	mov %rax, 0x30(%rbx)

	movzbl 0x40(%rbx), %eax
	report64
	movzwl 0x50(%rbx), %eax
	report64
	movl 0x60(%rbx), %eax	/* a 32-bit load zero-extends into %rax */
	report64
	mov 0x70(%rbx), %rax
	report64

	/* the same page through an index register and a different base: 0xd0000000 + 8 * 0x10 */
	mov $0x10, %ecx
	mov %rbx, %rsi
	movl $0xcafef00d, (%rsi, %rcx, 8)

	debug_exit EXIT_OK
