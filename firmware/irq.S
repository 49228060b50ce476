/*
 * An interrupt from the host through KVM_IRQFD (GSI 5) and the in-kernel 8259A PIC: the guest sets
 * up an IDT gate for vector 0x25 (PIC vector base 0x20 + IRQ 5), initialises both PICs with only IRQ 5
 * unmasked, enables interrupts, says "ready" on PORT_READY and waits in HLT.  The test writes the irqfd
 * then.  The handler sends EOI, records the vector and returns; the main loop reports the vector and
 * how many interrupts came, and exits.
 *
 * The PIC reaches the CPU through LAPIC LINT0 in ExtINT mode, which KVM's APIC reset state and
 * pyvmm's cpu.setup_lapic give the boot CPU.
 */
	.include "common.inc"

	/* 8259A ports and command words (Intel 8259A data sheet, "Initialization Command Words" and
	 * "Operation Command Words") */
	.equ PIC1_CMD,  0x20
	.equ PIC1_DATA, 0x21
	.equ PIC2_CMD,  0xa0
	.equ PIC2_DATA, 0xa1
	.equ ICW1_INIT_ICW4, 0x11	/* ICW1: D4=1 (ICW1), edge triggered (LTIM=0), cascade (SNGL=0), IC4=1 */
	.equ ICW2_MASTER, 0x20		/* ICW2: vector base T7-T3 for IR0..7 */
	.equ ICW2_SLAVE, 0x28
	.equ ICW3_MASTER, 0x04		/* ICW3 (master): a slave on IR2 (bit 2) */
	.equ ICW3_SLAVE, 0x02		/* ICW3 (slave): its slave ID, 2 */
	.equ ICW4_8086, 0x01		/* ICW4: uPM=1 (8086/8088 mode), normal EOI, not buffered */
	.equ OCW1_ONLY_IRQ5, 0xdf	/* OCW1 (interrupt mask register): 1 = masked; IR5 open */
	.equ OCW1_ALL, 0xff
	.equ OCW2_EOI, 0x20		/* OCW2: non-specific EOI (R=0, SL=0, EOI=1) */

	.equ IRQ, 5
	.equ VECTOR, ICW2_MASTER + IRQ

	.globl _start
_start:
	setup_idt
	lea idt(%rip), %rdi
	mov $VECTOR, %esi
	lea irq_handler(%rip), %rax
	set_gate

	/* ICW1..ICW4 to each PIC in the data sheet's order, then the masks (OCW1) */
	mov $ICW1_INIT_ICW4, %al
	out %al, $PIC1_CMD
	out %al, $PIC2_CMD
	mov $ICW2_MASTER, %al
	out %al, $PIC1_DATA
	mov $ICW2_SLAVE, %al
	out %al, $PIC2_DATA
	mov $ICW3_MASTER, %al
	out %al, $PIC1_DATA
	mov $ICW3_SLAVE, %al
	out %al, $PIC2_DATA
	mov $ICW4_8086, %al
	out %al, $PIC1_DATA
	out %al, $PIC2_DATA
	mov $OCW1_ONLY_IRQ5, %al
	out %al, $PIC1_DATA
	mov $OCW1_ALL, %al
	out %al, $PIC2_DATA

	sti
	mov $PORT_READY, %dx
	out %al, %dx

	/* Wait: check the count with interrupts off, then STI;HLT, which cannot lose a wake-up (the
	 * interrupt window opens only after the instruction following STI, SDM vol. 2 "STI"). */
wait:	cli
	cmpl $0, irq_count(%rip)
	jne done
	sti
	hlt
	jmp wait

done:	mov irq_vector(%rip), %eax
	report32
	mov irq_count(%rip), %eax
	report32
	debug_exit EXIT_OK

irq_handler:
	push %rax
	mov $OCW2_EOI, %al
	out %al, $PIC1_CMD
	incl irq_count(%rip)
	movl $VECTOR, irq_vector(%rip)
	pop %rax
	iretq

	.balign 4
irq_count:	.long 0
irq_vector:	.long 0

	idt_support
