/*
 * A guest that reports a kernel panic on COM1 in Linux's words and then, as `panic=-1` or `panic=N` does,
 * resets the machine at once through the keyboard controller.  pyvmm must still end with the panic's
 * status, not the reset's (tests/kvm/test_panic_verdict.py).
 */
	.include "common.inc"

	.globl _start
_start:
	puts message

reset:	mov $0xfe, %al
	outb %al, $0x64
2:	jmp 2b

message:
	.ascii "[    1.234567] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n"
	.asciz "[    1.234600] Rebooting in 1 seconds..\n"
