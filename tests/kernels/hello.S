# The smallest multiboot kernel: print over COM1, exit through isa-debug-exit.
        .text
        .align 4
        .long 0x1BADB002, 0x00000003, -(0x1BADB002 + 0x00000003)

        .code32
        .globl _start
_start:
        cmp $0x2BADB002, %eax
        jne fail
        mov $msg, %esi
1:      lodsb
        test %al, %al
        jz 2f
        mov %al, %bl
        mov $0x3fd, %dx
3:      in %dx, %al
        test $0x20, %al
        jz 3b
        mov $0x3f8, %dx
        mov %bl, %al
        out %al, %dx
        jmp 1b
2:      mov $0, %al
        out %al, $0xf4
fail:   mov $1, %al
        out %al, $0xf4
        hlt
msg:    .asciz "hello from real x86\n"
