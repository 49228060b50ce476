/*
 * A guest that hangs without a single exit: one line on COM1, then a jump to itself forever.  The stop
 * report must call it stuck, in the guest, at `spin` (tests/kvm/test_stop_report.py).
 */
	.include "common.inc"

	.globl _start
_start:
	puts message

spin:	jmp spin

message:
	.asciz "pyvmm spin guest: spinning\n"
