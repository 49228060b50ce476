/*
 * Exit round trips for bench/exits.py: reads N from PORT_IN, then runs N iterations of each phase,
 * writing the phase number to PORT_READY (a 32-bit out) before each and after the last:
 *   0 empty loop (no exit: the loop's own cost)     1 outl to PORT_LOOP        2 inl from PORT_LOOP
 *   3 32-bit store to MMIO_PLAIN                    4 32-bit load from MMIO_PLAIN
 *   5 store to MMIO_NOTIFY (a virtio-mmio QueueNotify handled in Python)
 *   6 store to MMIO_EVENTFD (a QueueNotify address with a registered ioeventfd: no exit to user space)
 * N must be at least 1.
 */
	.include "common.inc"

	.equ PORT_LOOP, 0x518
	.equ MMIO_PLAIN, 0xd0000000
	.equ MMIO_NOTIFY, 0xd0001050
	.equ MMIO_EVENTFD, 0xd0002050

	.macro phase n
	mov $\n, %eax
	mov $PORT_READY, %dx
	outl %eax, %dx
	.endm

	.globl _start
_start:
	mov $PORT_IN, %dx
	inl %dx, %eax
	mov %eax, %r8d

	phase 0
	mov %r8d, %ecx
0:	dec %ecx
	jnz 0b

	phase 1
	mov %r8d, %ecx
	mov $PORT_LOOP, %dx
1:	outl %eax, %dx
	dec %ecx
	jnz 1b

	phase 2
	mov %r8d, %ecx
	mov $PORT_LOOP, %dx
2:	inl %dx, %eax
	dec %ecx
	jnz 2b

	phase 3
	movabs $MMIO_PLAIN, %rbx
	mov %r8d, %ecx
3:	movl %eax, (%rbx)
	dec %ecx
	jnz 3b

	phase 4
	mov %r8d, %ecx
4:	movl (%rbx), %eax
	dec %ecx
	jnz 4b

	phase 5
	movabs $MMIO_NOTIFY, %rbx
	mov %r8d, %ecx
	xor %eax, %eax
5:	movl %eax, (%rbx)
	dec %ecx
	jnz 5b

	phase 6
	movabs $MMIO_EVENTFD, %rbx
	mov %r8d, %ecx
	xor %eax, %eax
6:	movl %eax, (%rbx)
	dec %ecx
	jnz 6b

	phase 7
	debug_exit EXIT_OK
