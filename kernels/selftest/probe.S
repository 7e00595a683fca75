/*
 * probe.S - run exactly one memory access (or one instruction fetch) at CPL 0 or CPL 3 and come
 * back to the caller whether it faults or not.
 *
 *   uintptr_t probe_run(uintptr_t kentry, uintptr_t addr, uintptr_t val, uintptr_t addr2,
 *                       struct trapframe *utf, uintptr_t ac);
 *
 * CPL 0 (utf == 0): the callee-saved registers, the flags and the stack pointer are saved, then
 * kentry (one of the k_* stubs below) runs with addr in SI, val in DX, addr2 in DI; with ac != 0
 * it runs between stac and clac (EFLAGS.AC = 1, SMAP's override).  A stub that returns normally
 * lands in probe_resume with its result in AX.
 * CPL 3 (utf != 0): utf is a ring-3 frame built by the C side (ip = the user alias of one of the
 * u_* stubs, registers already holding addr/val/addr2): the library's trap_return enters it with
 * iret.  The stub ends with int $0x80.
 * Either way an exception, or the int $0x80, reaches ktrap() (selftest.c), which records what
 * happened and resumes the trap frame at probe_resume at CPL 0: the saved stack pointer is
 * reloaded, so the frame the CPU pushed (on this stack for a CPL-0 fault, on the TSS stack for
 * CPL 3) is simply dropped - a longjmp.
 *
 * Fetch probes jump to a page that holds int $0x80 (CD 80) at the target: a fetch that succeeds
 * comes back the same way as a fault, through ktrap.
 *
 * The u_* stubs live in a page of their own (.text.user, page-aligned and padded), which
 * selftest.c maps a second time at a user address with U/S = 1.  They hold no sensitive
 * instruction (the runner intercepts those by address).
 */
    .text
#if defined(FMT_64)
    .code64
    .globl probe_run
probe_run:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushfq
    movq %rsp, probe_sp(%rip)
    testq %r8, %r8
    jz 1f
    movq %r8, %rdi                   /* trap_return(utf): iretq into ring 3 */
    jmp trap_return
1:  movq %rdi, %rax
    movq %rcx, %rdi
    testq %r9, %r9
    jz 2f
    stac
2:  call *%rax
    testq %r9, %r9                   /* the k_* stubs leave r9 alone */
    jz probe_resume
    clac
    .globl probe_resume
probe_resume:                        /* rax = the result */
    movq probe_sp(%rip), %rsp
    popfq                            /* also clears AC if a fault skipped the clac */
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

    .globl k_read, k_write, k_fetch, k_write32, k_write64
k_read:
    movq (%rsi), %rax
    ret
k_write:
    movq %rdx, (%rsi)
    ret
k_fetch:
    call *%rsi                       /* the target's int $0x80 (or its fault) ends the probe */
k_write32:
    movl %edx, (%rsi)
    ret
k_write64:
    movq %rdx, (%rsi)
    ret

    /* void call_on_stack(void (*fn)(void), void *top): run fn on another stack, never return */
    .globl call_on_stack
call_on_stack:
    movq %rsi, %rsp
    call *%rdi
3:  hlt
    jmp 3b

    .section .text.user, "ax"
    .balign 4096
    .globl u_page, u_read, u_write, u_fetch, u_write_read
u_page:
u_read:
    movq (%rsi), %rax
    int $0x80
u_write:
    movq %rdx, (%rsi)
    int $0x80
u_fetch:
    jmp *%rsi
u_write_read:
    movq %rdx, (%rsi)
    movq (%rdi), %rax
    int $0x80
    .balign 4096, 0xcc
#else
    .code32
    .globl probe_run
probe_run:
    pushl %ebx
    pushl %ebp
    pushl %esi
    pushl %edi
    pushfl
    movl %esp, probe_sp
    /* 20 bytes pushed, then the return address: the arguments start at 24(%esp) */
    movl 40(%esp), %eax
    testl %eax, %eax
    jz 1f
    pushl %eax                       /* trap_return(utf): iret into ring 3 */
    call trap_return
1:  movl 24(%esp), %eax
    movl 28(%esp), %esi
    movl 32(%esp), %edx
    movl 36(%esp), %edi
    cmpl $0, 44(%esp)
    je 2f
    stac
2:  call *%eax
    movl probe_sp, %ecx
    cmpl $0, 44(%ecx)                /* the ac argument, seen from the saved stack pointer */
    je probe_resume
    clac
    .globl probe_resume
probe_resume:                        /* eax = the result */
    movl probe_sp, %esp
    popfl
    popl %edi
    popl %esi
    popl %ebp
    popl %ebx
    ret

    .globl k_read, k_write, k_fetch, k_write32, k_write64
k_read:
    movl (%esi), %eax
    ret
k_write:
    movl %edx, (%esi)
    ret
k_fetch:
    call *%esi
k_write32:
    movl %edx, (%esi)
    ret
k_write64:                           /* one 8-byte store: edi:edx -> (esi), as cmpxchg8b */
    pushl %ebx
    movl %edx, %ebx
    movl %edi, %ecx
    movl (%esi), %eax
    movl 4(%esi), %edx
4:  lock cmpxchg8b (%esi)
    jnz 4b
    popl %ebx
    ret

    .globl call_on_stack
call_on_stack:
    movl 4(%esp), %eax
    movl 8(%esp), %esp
    call *%eax
3:  hlt
    jmp 3b

    .section .text.user, "ax"
    .balign 4096
    .globl u_page, u_read, u_write, u_fetch, u_write_read
u_page:
u_read:
    movl (%esi), %eax
    int $0x80
u_write:
    movl %edx, (%esi)
    int $0x80
u_fetch:
    jmp *%esi
u_write_read:
    movl %edx, (%esi)
    movl (%edi), %eax
    int $0x80
    .balign 4096, 0xcc
#endif

    .section .bss
    .balign 8
    .globl probe_sp
probe_sp:
    .skip 8

    .section .note.GNU-stack, "", @progbits
