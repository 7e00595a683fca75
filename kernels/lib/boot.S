/*
 * boot.S - multiboot v1 header and the first instructions of every kernel.
 *
 * The loader enters _start in 32-bit flat protected mode, paging off, interrupts off,
 * EAX = 0x2BADB002 and EBX = the multiboot info.  We zero .bss (not trusting the loader),
 * take the kernel stack and call lib_start(magic, info) in C.  The 64-bit build first has to
 * reach long mode, which needs paging: it identity-maps the first 1 GiB with 2 MiB pages in
 * boot tables (lib_start then replaces them by the final map) and far-jumps into 64-bit code.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003          /* bit 0: page-align modules, bit 1: memory info */

    .section .multiboot, "a"
    .balign 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text.boot, "ax"
    .code32
    .globl _start
_start:
    cld
    movl %eax, %esi                  /* keep magic and info: rep stos uses eax, edi, ecx */
    movl %ebx, %ebp
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl $kstack_top, %esp

#if !defined(FMT_64)
    pushl %ebp                       /* lib_start(magic, info) */
    pushl %esi
    call lib_start
1:  hlt
    jmp 1b
#else
    /* boot tables: PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] = i * 2 MiB, P|RW|PS (supervisor) */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, boot_pd(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jne 2b

#if defined(LA57)
    movl $boot_pml4, %eax            /* 5-level: PML5[0] -> the PML4 above */
    orl $0x3, %eax
    movl %eax, boot_pml5
    movl %cr4, %eax                  /* PAE and LA57 before long-mode paging (LA57 is fixed after) */
    orl $0x1020, %eax
    movl %eax, %cr4
    movl $boot_pml5, %eax
    movl %eax, %cr3
#else
    movl %cr4, %eax                  /* PAE before long-mode paging */
    orl $0x20, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
#endif
    movl $0xC0000080, %ecx           /* EFER.LME before CR0.PG */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax            /* PG | WP | PE */
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq $kstack_top, %rsp
    movl %esi, %edi                  /* lib_start(magic, info) */
    movl %ebp, %esi
    call lib_start
3:  hlt
    jmp 3b

    .section .rodata
    .balign 8
boot_gdt:                            /* only to get into long mode; cpu.c loads the real one */
    .quad 0
    .quad 0x00AF9A000000FFFF         /* 0x08: 64-bit ring-0 code */
    .quad 0x00CF92000000FFFF         /* 0x10: ring-0 data */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .bss
    .balign 4096
boot_pml4: .skip 4096
#if defined(LA57)
boot_pml5: .skip 4096
#endif
boot_pdpt: .skip 4096
boot_pd:   .skip 4096
#endif

    .section .bss
    .balign 16
    .globl kstack_top
kstack: .skip 16384
kstack_top:

    .section .note.GNU-stack, "", @progbits
