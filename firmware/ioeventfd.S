/*
 * Stores to NOTIFY_ADDR, where the test registers an MMIO ioeventfd with datamatch MATCH: KVM signals
 * the eventfd for stores of MATCH (no exit) and exits to user space (KVM_EXIT_MMIO) for the others.
 * Then the same for a PIO ioeventfd without datamatch at PIO_NOTIFY (every write counts).
 * The values and counts are the contract with tests/kvm/test_ioeventfd.py.
 */
	.include "common.inc"

	.equ NOTIFY_ADDR, 0xd0001000
	.equ MATCH, 0x600dcafe
	.equ PIO_NOTIFY, 0x520

	.globl _start
_start:
	movabs $NOTIFY_ADDR, %rbx
	movl $MATCH, (%rbx)	/* matches: eventfd */
	movl $0x0badf00d, (%rbx)	/* does not match: exit */
	movl $MATCH, (%rbx)	/* eventfd */
	movl $(MATCH + 1), (%rbx)	/* exit */
	movl $MATCH, (%rbx)	/* eventfd */
	movl $1, (%rbx)	/* exit */

	mov $PIO_NOTIFY, %dx
	mov $7, %ax
	outw %ax, %dx
	outw %ax, %dx

	debug_exit EXIT_OK
