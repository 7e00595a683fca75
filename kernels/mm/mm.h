/*
 * mm.h - what the mm kernel and its user programs agree on: system-call numbers, program ids,
 * the user address-space layout, the header of the embedded user image.
 *
 * System calls: int 0x80, number in eax/rax; arguments in ebx, ecx, edx (32-bit builds) or
 * rdi, rsi, rdx (64-bit); result in eax/rax, a second result (wait's status) in edx/rdx.
 */
#ifndef MM_H
#define MM_H

#define SYS_EXIT   0     /* exit(status)                      never returns */
#define SYS_FORK   1     /* fork()                            child pid, 0 in the child, -1 */
#define SYS_EXEC   2     /* exec(prog, arg)                   returns only on failure: -1 */
#define SYS_WAIT   3     /* wait()                            pid (status in the second result), -1 if no child */
#define SYS_BRK    4     /* brk(addr)                         the break after the call (0: just read it) */
#define SYS_MMAP   5     /* mmap(npages)                      address of npages of fresh anonymous RW memory, -1 */
#define SYS_WRITE  6     /* write(buf, len)                   len written to the serial port, -1 */
#define SYS_GETPID 7     /* getpid() */
#define SYS_YIELD  8     /* yield()                           let the next runnable process run */
#define NSYSCALLS  9

/* programs of the user image, by id (exec's first argument); the names are the command line's */
#define PROG_DEMAND   0
#define PROG_FORKWAIT 1
#define PROG_MAKE     2  /* kbuild: make -> sh -> cc per unit, then ld */
#define PROG_SH       3
#define PROG_CC       4
#define PROG_LD       5
#define PROG_FAULTS   6  /* children that each do one forbidden thing and get killed */
#define NPROGS        7

/* user address space (kern.h: user space is [1 GiB, 2 GiB)) */
#define U_IMAGE     0x40000000u   /* text, rodata, then data and bss from the next page */
#define U_MMAP_BASE 0x60000000u   /* mmap() hands out addresses upwards from here; brk stays below */
#define U_STACK_TOP 0x7fff0000u
#define U_STACK_PAGES 64

#define UHDR_MAGIC 0x4d4d5531u    /* "1UMM" */
#ifndef __ASSEMBLER__
struct uhdr {                     /* at U_IMAGE: the image's first bytes (user/crt0.S) */
    unsigned int magic, entry, text_end, data_end, bss_end;
};
#endif

#endif
