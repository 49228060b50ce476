/*
 * A guest kernel's pvpanic driver, in short (drivers/misc/pvpanic/pvpanic.c): read the supported events
 * from the pvpanic port, and when that says PVPANIC_PANICKED is supported, write it, as the panic
 * notifier does.  No panic line goes to the console, so only the device can tell pyvmm.  Then, like
 * `panic=-1`, reset at once through the i8042: pyvmm must still end with the panic status
 * (tests/kvm/test_guest_reports.py).  If the port does not offer the event, say so and power on.
 */
	.include "common.inc"

	.equ PVPANIC_PORT, 0x505	/* layout.PVPANIC_PORT */
	.equ PVPANIC_PANICKED, 1	/* include/uapi/misc/pvpanic.h */

	.globl _start
_start:
	mov $PVPANIC_PORT, %dx
	inb %dx, %al
	test $PVPANIC_PANICKED, %al
	jz absent
	puts hello
	mov $PVPANIC_PANICKED, %al
	mov $PVPANIC_PORT, %dx
	outb %al, %dx

reset:	mov $0xfe, %al
	outb %al, $0x64
2:	jmp 2b

absent:	puts noevent
	jmp reset

hello:
	.asciz "pyvmm pvpanic guest: reporting a panic\n"
noevent:
	.asciz "pyvmm pvpanic guest: the port does not offer PVPANIC_PANICKED\n"
