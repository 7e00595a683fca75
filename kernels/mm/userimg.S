/* userimg.S - the user programs' flat image (build/obj-FMT/mm/user.bin), embedded in the kernel */
    .section .rodata
    .balign 4096
    .globl user_image, user_image_end
user_image:
    .incbin "mm/user.bin"            /* found through the variant's object folder (-Wa,-I) */
user_image_end:
    .section .note.GNU-stack, "", @progbits
