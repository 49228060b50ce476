/*
 * An instruction the software host KVM cannot emulate and the emulation assist does not handle:
 * crc32 (SSE4.2, f2 REX.W 0f 38 f1).  On that host the VM must stop with ExitStatus.EMULATION_FAILURE
 * and an error naming RIP and the instruction bytes; on a hardware KVM it runs natively and the guest
 * reports the CRC and exits normally.  Reports the instruction's address first (r64), so the test
 * can check the RIP in the error.
 *
 * Found by experiment on this host (2026-12): also unhandled there are xsave, xgetbv, rdtscp, lock
 * cmpxchg16b, BMI1/2 (andn, pdep) and SSE arithmetic/moves (addps, cvtsd2si, movq xmm, pshufb,
 * pclmulqdq); rdrand, rdseed, lzcnt and tzcnt are emulated.
 */
	.include "common.inc"

	.globl _start
_start:
	lea insn(%rip), %rax
	report64
	mov $0x1234, %eax
	xor %ebx, %ebx
insn:	crc32q %rax, %rbx
	mov %rbx, %rax
	report64
	debug_exit EXIT_OK
