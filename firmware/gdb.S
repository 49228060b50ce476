/*
 * A guest for the gdb server's tests (tests/kvm/test_gdb.py), run with the guest stopped at _start
 * until the test's gdb client continues it.  Each label below is a place the client stops at or reads:
 *
 *   _start       maps guest-physical 0-4 GiB a second time at ALIAS (PML4 entry 256 -> pyvmm's boot
 *                PDPT), so the client can read and write `data` through the page tables at a virtual
 *                address that is not the physical one
 *   break_here   a software breakpoint: rax, rbx and rcx hold known values; the client changes rbx
 *                before the `mov` runs, single-steps it, and the guest reports rcx (r64)
 *   (then)       the guest reports the quad at `data` (r64), which the client rewrote through ALIAS
 *   hw_here      a hardware breakpoint (DR0)
 *   write_here   a store to `counter`: a write watchpoint stops right after it (where the host has them)
 *   spin         loops until `go_on` is non-zero: the client stops it with Ctrl-C, sets go_on and detaches
 *   end          reports 0x600d600d and exits with EXIT_OK
 */
	.include "common.inc"

	.equ PML4, 0x9000		/* pyvmm/arch/x86_64/layout.py PML4_ADDR, PDPT_ADDR */
	.equ PDPT, 0xa000
	.equ ALIAS_SLOT, 256		/* PML4 index 256: virtual 0xffff800000000000 */
	.equ PTE_P_RW, 0x3

	.globl _start, break_here, after_mov, hw_here, write_here, after_write, spin, spin_end, data, counter, go_on
_start:
	setup_idt
	movq $(PDPT | PTE_P_RW), PML4 + 8 * ALIAS_SLOT
	mov %cr3, %rax
	mov %rax, %cr3

	movabs $0x1122334455667788, %rax
	movabs $0x99aabbccddeeff00, %rbx
	xor %ecx, %ecx
break_here:
	mov %rbx, %rcx
after_mov:
	mov %rcx, %rax
	report64
	mov data(%rip), %rax
	report64
hw_here:
	nop
write_here:
	movl $0x5a5a5a5a, counter(%rip)
after_write:
	nop
spin:
	mov go_on(%rip), %eax
	test %eax, %eax
	jz spin
spin_end:
	mov $0x600d600d, %eax
	report32
	debug_exit EXIT_OK

	.balign 8
data:	.quad 0x0123456789abcdef
counter: .long 0
go_on:	.long 0

	idt_support
