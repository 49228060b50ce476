/*
 * Port I/O both ways: a string to the serial port byte by byte, a value read from PORT_IN echoed to
 * PORT_ECHO (1, 2 and 4 bytes wide), and the result code EXIT_OK to the debug-exit port.
 */
	.include "common.inc"

	.globl _start
_start:
	puts message

	mov $PORT_IN, %dx
	inb %dx, %al
	mov $PORT_ECHO, %dx
	outb %al, %dx

	mov $PORT_IN, %dx
	inw %dx, %ax
	mov $PORT_ECHO, %dx
	outw %ax, %dx

	mov $PORT_IN, %dx
	inl %dx, %eax
	mov $PORT_ECHO, %dx
	outl %eax, %dx

	debug_exit EXIT_OK

message:
	.asciz "pyvmm pio guest: hello\n"
