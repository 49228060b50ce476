/*
 * Instructions this project's software host KVM cannot emulate and pyvmm's emulation assist performs
 * (pyvmm/arch/x86_64/assist.py; docs/hosts.md).  On a hardware KVM they run natively: either way
 * the guest-visible results must be the architectural ones, which tests/kvm/test_assist.py computes
 * in Python.  Reports, in order, on PORT_REPORT (r32 = one write, r64 = low and high halves):
 *
 *   int3      r32 #BP handler calls (1), r64 saved RIP, r64 address after the int3 (equal)
 *   fwait     r32 0xf0a17f0a
 *   popcnt    per case: r64 the destination register, r32 RFLAGS & (OF|SF|ZF|AF|PF|CF)
 *             (the destination starts as DEST_INIT, RFLAGS with all six flags set)
 *   mxcsr     r32 MXCSR at entry, r32 after ldmxcsr MXCSR_A (rip-relative) / stmxcsr (base),
 *             r32 after ldmxcsr MXCSR_B (base + disp8 on the stack) / stmxcsr (base + index)
 *   end       r32 0x600d600d
 */
	.include "common.inc"

	.equ CR4_OSFXSR, 1 << 9		/* SDM vol. 3A, 2.5: without it SSE/ldmxcsr/stmxcsr raise #UD */
	.equ CR4_OSXMMEXCPT, 1 << 10
	.equ ARITH_FLAGS, 0x8d5		/* OF(11) SF(7) ZF(6) AF(4) PF(2) CF(0) */
	.equ BP_VECTOR, 3

	/* Preset the destination and flags, run \insn, report the destination and the flags. */
	.macro popcnt_case insn, dst
	movabs $0xdeadbeefcafef00d, %rax
	mov %rax, \dst
	push $(ARITH_FLAGS | 2)
	popfq
	\insn
	pushfq
	mov \dst, %rax
	report64
	pop %rax
	and $ARITH_FLAGS, %eax
	report32
	.endm

	.globl _start
_start:
	setup_idt
	lea idt(%rip), %rdi
	mov $BP_VECTOR, %esi
	lea bp_handler(%rip), %rax
	set_gate

	mov %cr4, %rax
	or $(CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
	mov %rax, %cr4

	/* --- int3: a trap, so the handler sees the address after it ------------------------------ */
	int3
after_int3:
	mov bp_count(%rip), %eax
	report32
	mov bp_rip(%rip), %rax
	report64
	lea after_int3(%rip), %rax
	report64

	/* --- fwait: no x87 exception pending, a no-op ------------------------------------------------- */
	fwait
	mov $0xf0a17f0a, %eax
	report32

	/* --- popcnt, register forms: 64, 32 (zero-extends), 16 (keeps bits 63:16), REX regs, zero --- */
	lea data(%rip), %rbx
	movabs $0xf0f000001234567f, %rcx
	popcnt_case "popcnt %rcx, %rax", %rax
	movabs $0xffffffff00000003, %rcx
	popcnt_case "popcnt %ecx, %esi", %rsi
	mov $0x8001, %ecx
	popcnt_case "popcnt %cx, %di", %rdi
	movabs $0x8000000000000001, %r9
	popcnt_case "popcnt %r9, %r10", %r10
	xor %ecx, %ecx
	popcnt_case "popcnt %rcx, %r11", %r11

	/* --- popcnt, memory forms: rip-relative, base + disp8, base + index * scale ---------------- */
	popcnt_case "popcntq pop_q(%rip), %r8", %r8
	popcnt_case "popcntl 4(%rbx), %r12d", %r12
	mov $4, %ecx
	popcnt_case "popcntw (%rbx, %rcx, 2), %r13w", %r13
	popcnt_case "popcntq 16(%rbx), %r14", %r14

	/* --- ldmxcsr / stmxcsr ---------------------------------------------------------------------- */
	stmxcsr 32(%rbx)
	mov 32(%rbx), %eax
	report32
	ldmxcsr mxcsr_a(%rip)
	stmxcsr 36(%rbx)
	mov 36(%rbx), %eax
	report32
	sub $16, %rsp
	movl $MXCSR_B, 8(%rsp)
	ldmxcsr 8(%rsp)
	add $16, %rsp
	mov $10, %ecx
	stmxcsr (%rbx, %rcx, 4)
	mov 40(%rbx), %eax
	report32
	ldmxcsr mxcsr_default(%rip)

	mov $0x600d600d, %eax
	report32
	debug_exit EXIT_OK

	.equ MXCSR_A, 0x7f80		/* all exceptions masked, RC = 11b (toward zero) */
	.equ MXCSR_B, 0x3fa1		/* RC = 01b (down), PM set, flags IE and PE set */

bp_handler:
	incl bp_count(%rip)
	push %rax
	mov 8(%rsp), %rax	/* the saved RIP (SDM vol. 3A, 6.14.2: #BP pushes no error code) */
	mov %rax, bp_rip(%rip)
	pop %rax
	iretq

	.balign 8
bp_count:	.long 0
	.balign 8
bp_rip:		.quad 0
pop_q:		.quad 0x0123456789abcdef
mxcsr_a:	.long MXCSR_A
mxcsr_default:	.long 0x1f80

	.balign 16
data:	.long 0x11111111		/* 0 */
	.long 0x80000001		/* 4: popcntl 4(%rbx) */
	.word 0x7ff7, 0, 0, 0		/* 8: popcntw (%rbx, %rcx = 4, 2) */
	.quad 0xffffffffffffffff	/* 16: popcntq 16(%rbx) */
	.quad 0				/* 24 */
	.long 0, 0, 0			/* 32, 36, 40: stmxcsr targets */

	idt_support
