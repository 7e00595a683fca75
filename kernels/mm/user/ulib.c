/* ulib.c - printf for user programs: one write() per call, so lines from processes never mix */
#include "ulib.h"

struct buf { char s[256]; int n; };

static void put(char c, void *arg)
{
    struct buf *b = arg;
    if (b->n == (int)sizeof(b->s)) {
        u_write(b->s, b->n);
        b->n = 0;
    }
    b->s[b->n++] = c;
}

void uprintf(const char *fmt, ...)
{
    struct buf b;
    b.n = 0;
    va_list ap;
    va_start(ap, fmt);
    vformat(put, &b, fmt, ap);
    va_end(ap);
    if (b.n)
        u_write(b.s, b.n);
}
