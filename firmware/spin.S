/*
 * A guest that hangs without a single exit: one line on COM1, then a jump to itself forever.  The stop
 * report must call it stuck, in the guest, at `spin` (tests/kvm/test_stop_report.py).
 */
	.include "common.inc"

	.globl _start
_start:
	lea message(%rip), %rsi
	mov $COM1, %dx
1:	lodsb
	test %al, %al
	jz spin
	outb %al, %dx
	jmp 1b

spin:	jmp spin

message:
	.asciz "pyvmm spin guest: spinning\n"
