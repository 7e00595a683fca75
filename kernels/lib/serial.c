/*
 * serial.c - output on COM1 and the way out through isa-debug-exit.
 *
 * No UART set-up: the machine's 16550 transmits at whatever rate it has; we only poll LSR.THRE
 * (bit 5) before each byte, as the contract's machine expects.
 */
#include "kern.h"

#define COM1 0x3f8
#define EXIT_PORT 0xf4

void kputc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (uint8_t)c);
}

void kputs(const char *s)
{
    while (*s)
        kputc(*s++);
}

static void kout(char c, void *arg)
{
    (void)arg;
    kputc(c);
}

void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vformat(kout, 0, fmt, ap);
    va_end(ap);
}

void kexit(int code)
{
    outb(EXIT_PORT, (uint8_t)code);
    for (;;)                         /* not reached when the machine has the exit device */
        __asm__ volatile("cli; hlt");
}

void kpanic(const char *fmt, ...)
{
    va_list ap;
    kputs("panic: ");
    va_start(ap, fmt);
    vformat(kout, 0, fmt, ap);
    va_end(ap);
    kputc('\n');
    kexit(1);
}
