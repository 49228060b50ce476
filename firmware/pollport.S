/*
 * A guest that hangs while exiting all the time: one line on COM1, then it polls a status port for a
 * BUSY bit to clear.  No device claims the port, and an unclaimed PIO read returns all ones (an empty ISA
 * bus), so BUSY never clears: every iteration is a KVM_EXIT_IO.  The stop report must call it slow, at
 * `poll` (tests/kvm/test_stop_report.py).  A driver polling a device that is not there does the same.
 */
	.include "common.inc"

	.equ PORT_ABSENT, 0x530	/* claimed by no device, in TinyVm or in `pyvmm run` */
	.equ STATUS_BUSY, 0x80

	.globl _start
_start:
	puts message

	mov $PORT_ABSENT, %dx
poll:	inb %dx, %al
	test $STATUS_BUSY, %al
	jnz poll
	debug_exit EXIT_OK

message:
	.asciz "pyvmm pollport guest: waiting for the device\n"
