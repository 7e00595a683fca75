/* ulib.h - the user programs' library: system calls and printf over write() */
#ifndef ULIB_H
#define ULIB_H
#include <stdint.h>
#include <stddef.h>
#include <stdarg.h>
#include "../mm.h"

static inline long sys3(long n, long a, long b, long c, long *ret2)
{
    long r, r2;
#if defined(FMT_64)
    __asm__ volatile("int $0x80" : "=a"(r), "=d"(r2) : "a"(n), "D"(a), "S"(b), "d"(c) : "memory");
#else
    __asm__ volatile("int $0x80" : "=a"(r), "=d"(r2) : "a"(n), "b"(a), "c"(b), "d"(c) : "memory");
#endif
    if (ret2)
        *ret2 = r2;
    return r;
}

static inline __attribute__((noreturn)) void u_exit(int status)
{
    sys3(SYS_EXIT, status, 0, 0, 0);
    __builtin_unreachable();
}
static inline long u_fork(void) { return sys3(SYS_FORK, 0, 0, 0, 0); }
static inline long u_exec(int prog, long arg) { return sys3(SYS_EXEC, prog, arg, 0, 0); }
static inline long u_wait(int *status)
{
    long st;
    long pid = sys3(SYS_WAIT, 0, 0, 0, &st);
    *status = (int)st;
    return pid;
}
static inline uintptr_t u_brk(uintptr_t addr) { return (uintptr_t)sys3(SYS_BRK, (long)addr, 0, 0, 0); }
static inline uintptr_t u_mmap(long npages) { return (uintptr_t)sys3(SYS_MMAP, npages, 0, 0, 0); }
static inline long u_write(const void *buf, long len) { return sys3(SYS_WRITE, (long)buf, len, 0, 0); }
static inline long u_getpid(void) { return sys3(SYS_GETPID, 0, 0, 0, 0); }
static inline void u_yield(void) { sys3(SYS_YIELD, 0, 0, 0, 0); }

void uprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void vformat(void (*out)(char, void *), void *arg, const char *fmt, va_list ap);   /* lib/format.c */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
size_t strlen(const char *s);

#endif
