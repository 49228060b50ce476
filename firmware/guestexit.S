/*
 * A guest that ends the VM with a status of its choosing through pyvmm's guest exit device
 * (pyvmm/devices/guestexit.py): it checks the magic and version registers, then writes to the status
 * register the number the kernel command line starts with (decimal), so one guest tests any status
 * (tests/kvm/test_guest_reports.py).  The command line is found as a kernel finds it: boot_params at
 * 0x7000 (layout.ZERO_PAGE_ADDR), its cmd_line_ptr at offset 0x228 (arch/x86/include/uapi/asm/bootparam.h).
 * Without the device (a bad magic) it resets.
 */
	.include "common.inc"

	.equ GUEST_EXIT, 0xd0009000	/* layout.GUEST_EXIT_ADDR */
	.equ REG_MAGIC, 0x0
	.equ REG_VERSION, 0x4
	.equ REG_STATUS, 0x8
	.equ MAGIC, 0x78657970		/* "pyex" */
	.equ CMD_LINE_PTR, 0x7228

	.globl _start
_start:
	mov $GUEST_EXIT, %rbx
	mov REG_MAGIC(%rbx), %eax
	cmp $MAGIC, %eax
	jne absent
	cmpl $1, REG_VERSION(%rbx)
	jne absent

	/* status = the decimal number at the start of the command line (0 if none) */
	mov CMD_LINE_PTR, %esi
	xor %ecx, %ecx
digit:	movzbl (%rsi), %eax
	sub $'0', %eax
	cmp $9, %eax
	ja done
	imul $10, %ecx, %ecx
	add %eax, %ecx
	inc %rsi
	jmp digit
done:	puts hello
	mov %ecx, REG_STATUS(%rbx)
	puts still
	debug_exit EXIT_FAIL

absent:	puts nodevice
	mov $0xfe, %al
	outb %al, $0x64
2:	jmp 2b

hello:
	.asciz "pyvmm guest-exit guest: writing the status\n"
still:
	.asciz "pyvmm guest-exit guest: still running after the write\n"
nodevice:
	.asciz "pyvmm guest-exit guest: no guest exit device\n"
