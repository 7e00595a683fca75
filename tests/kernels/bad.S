# Kernels that go wrong in one way each, chosen by the symbol the test links as entry:
#   triple   an IDT with limit 0 and an UD2: #UD -> #GP (no gate) -> #DF -> #GP: triple fault
#   hang     a loop with no exit
#   halt     CLI; HLT: nothing can wake it
#   unmapped a store to physical 0xC0000000, where there is no RAM and no device
        .text
        .align 4
        .long 0x1BADB002, 0x00000003, -(0x1BADB002 + 0x00000003)
        .code32
        .globl triple, hang, halt, unmapped
triple: lidt idtr
        ud2
hang:   jmp hang
halt:   cli
        hlt
unmapped:
        movl $0x1234, 0xC0000000
        mov $0, %al
        out %al, $0xf4
        .align 8
idtr:   .word 0
        .long 0
