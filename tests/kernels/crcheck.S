# Control-register and EFER writes that KVM refuses with #GP(0) (QEMU 5.0 checks none of
# them), then one it allows.  A #GP handler counts the faults, ORs their error codes into EBX
# and resumes at the address left in ESI.  Exit value: count | (EBX != 0) << 4; expect 4.
        .text
        .align 4
        .long 0x1BADB002, 0x00000003, -(0x1BADB002 + 0x00000003)
        .code32
        .globl _start
_start: lgdt gdtr
        ljmp $0x08, $1f
1:      mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $stack_top, %esp
        mov $gp_handler, %eax           # IDT gate 13: 32-bit interrupt gate to gp_handler
        mov %ax, idt + 13 * 8
        movw $0x08, idt + 13 * 8 + 2
        movw $0x8E00, idt + 13 * 8 + 4
        shr $16, %eax
        mov %ax, idt + 13 * 8 + 6
        lidt idtr
        xor %edi, %edi
        xor %ebx, %ebx
        # 1: CR4.SMXE (bit 14): not a feature of the guest's CPU
        mov %cr4, %eax
        or $0x4000, %eax
        mov $2f, %esi
        mov %eax, %cr4
2:      # 2: CR0.NW=1 with CD=0
        mov %cr0, %eax
        or $0x20000000, %eax
        and $~0x40000000, %eax
        mov $3f, %esi
        mov %eax, %cr0
3:      # 3: EFER bit 1 (reserved)
        mov $0xC0000080, %ecx
        rdmsr
        or $2, %eax
        mov $4f, %esi
        wrmsr
4:      # 4: CR0.PG=1 with PE=0
        mov %cr0, %eax
        and $~1, %eax
        or $0x80000000, %eax
        mov $5f, %esi
        mov %eax, %cr0
5:      # 5: allowed: CR4.PSE
        mov %cr4, %eax
        or $0x10, %eax
        mov $6f, %esi
        mov %eax, %cr4
6:      mov %edi, %eax
        test %ebx, %ebx
        jz 7f
        or $0x10, %eax
7:      out %al, $0xf4
        hlt
gp_handler:
        inc %edi
        pop %eax                        # the error code
        or %eax, %ebx
        mov %esi, (%esp)                # resume after the refused write
        iret
        .data
        .align 8
gdt:    .quad 0
        .quad 0x00CF9A000000FFFF
        .quad 0x00CF92000000FFFF
gdtr:   .word 23
        .long gdt
idt:    .space 14 * 8
idtr:   .word 14 * 8 - 1
        .long idt
        .space 1024
stack_top:
