/*
 * entry.S - the IDT's targets: one stub per exception vector 0-31 and the int 0x80 gate.
 *
 * Each stub makes the frame uniform (a 0 error code where the CPU pushes none, then the vector),
 * trap_common saves the general registers so the stack holds a struct trapframe (kern.h), calls
 * ktrap(tf) and returns through whatever the frame then holds: a system call's result, or
 * another process's registers after a switch.
 */
    .text
#if !defined(FMT_64)
    .code32
#define PTR .long
#else
    .code64
#define PTR .quad
#endif

.macro STUB n, err
vec_\n:
    .if \err == 0
    push $0
    .endif
    push $\n
    jmp trap_common
.endm

STUB 0,0
STUB 1,0
STUB 2,0
STUB 3,0
STUB 4,0
STUB 5,0
STUB 6,0
STUB 7,0
STUB 8,1
STUB 9,0
STUB 10,1
STUB 11,1
STUB 12,1
STUB 13,1
STUB 14,1
STUB 15,0
STUB 16,0
STUB 17,1
STUB 18,0
STUB 19,0
STUB 20,0
STUB 21,1
STUB 22,0
STUB 23,0
STUB 24,0
STUB 25,0
STUB 26,0
STUB 27,0
STUB 28,0
STUB 29,1
STUB 30,1
STUB 31,0
STUB 128,0

#if !defined(FMT_64)
trap_common:
    pushal
    pushl %esp
    call ktrap
    addl $4, %esp
trap_exit:
    popal
    addl $8, %esp                    /* vector, error code */
    iret

    .globl trap_return
trap_return:                         /* trap_return(tf): resume a frame built by hand */
    movl 4(%esp), %esp
    jmp trap_exit
#else
trap_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi                  /* the CPU aligned RSP: 5+2+15 qwords keep it 16-aligned here */
    call ktrap
trap_exit:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp                   /* vector, error code */
    iretq

    .globl trap_return
trap_return:                         /* trap_return(tf): resume a frame built by hand */
    movq %rdi, %rsp
    jmp trap_exit
#endif

    .section .rodata
    .balign 8
    .globl trap_vectors
trap_vectors:                        /* the stubs of vectors 0-31, then 0x80 */
    PTR vec_0, vec_1, vec_2, vec_3, vec_4, vec_5, vec_6, vec_7
    PTR vec_8, vec_9, vec_10, vec_11, vec_12, vec_13, vec_14, vec_15
    PTR vec_16, vec_17, vec_18, vec_19, vec_20, vec_21, vec_22, vec_23
    PTR vec_24, vec_25, vec_26, vec_27, vec_28, vec_29, vec_30, vec_31
    PTR vec_128

    .section .note.GNU-stack, "", @progbits
