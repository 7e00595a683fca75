/*
 * format.c - the printf formatter, shared by the kernels (kprintf) and by user programs: it makes
 * no system call and touches no device, it only hands characters to out().
 * Conversions: %d %u %x %p %s %c %%, with l/ll, a width, the 0 and - flags.
 */
#include "kern.h"

static void out_str(void (*out)(char, void *), void *arg, const char *s, int width, int left, char pad)
{
    int n = (int)strlen(s);
    if (!left)
        for (; width > n; width--)
            out(pad, arg);
    while (*s)
        out(*s++, arg);
    for (; width > n; width--)
        out(' ', arg);
}

/* v / base, v %= base, without libgcc's 64-bit division (32-bit builds link no libgcc) */
static unsigned divmod(unsigned long long *v, unsigned base)
{
    unsigned long long q = 0, r = 0;
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((*v >> i) & 1);
        if (r >= base) {
            r -= base;
            q |= 1ull << i;
        }
    }
    *v = q;
    return (unsigned)r;
}

void vformat(void (*out)(char, void *), void *arg, const char *fmt, va_list ap)
{
    char buf[24];
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            out(*fmt, arg);
            continue;
        }
        fmt++;
        int left = 0, width = 0, lng = 0;
        char pad = ' ';
        if (*fmt == '-') { left = 1; fmt++; }
        if (*fmt == '0') { pad = '0'; fmt++; }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') { lng++; fmt++; }
        unsigned long long v;
        int neg = 0, base = 10;
        switch (*fmt) {
        case 'c':
            out((char)va_arg(ap, int), arg);
            continue;
        case 's': {
            const char *s = va_arg(ap, const char *);
            out_str(out, arg, s ? s : "(null)", width, left, ' ');
            continue;
        }
        case '%':
            out('%', arg);
            continue;
        case 'd': {
            long long x = lng >= 2 ? va_arg(ap, long long) : lng ? va_arg(ap, long) : va_arg(ap, int);
            neg = x < 0;
            v = neg ? -(unsigned long long)x : (unsigned long long)x;
            break;
        }
        case 'p':
            v = (uintptr_t)va_arg(ap, void *);
            base = 16;
            break;
        case 'x':
            base = 16;
            /* fall through */
        case 'u':
            v = lng >= 2 ? va_arg(ap, unsigned long long) : lng ? va_arg(ap, unsigned long)
                                                                : va_arg(ap, unsigned);
            break;
        default:                     /* unknown conversion: print it as it is */
            out('%', arg);
            if (!*fmt)
                return;
            out(*fmt, arg);
            continue;
        }
        char *p = buf + sizeof(buf) - 1;
        *p = 0;
        do {
            *--p = "0123456789abcdef"[divmod(&v, (unsigned)base)];
        } while (v);
        if (neg) {
            if (pad == '0') {        /* the sign goes before the zeros */
                out('-', arg);
                width--;
            } else {
                *--p = '-';
            }
        }
        out_str(out, arg, p, width, left, pad);
    }
}

