/*
 * progs.c - the user programs of the mm kernel, in one image; exec picks one by id (mm.h).
 *
 * Every value a program writes is a hash of (a tag, the page, the word), so a program can check
 * what it reads back and print a checksum that depends on nothing but its arguments: the same
 * in every paging format and under every MMU.  Words are 32-bit everywhere for that reason.
 * The shapes follow the Python model's workloads (src/shadowmmu/guest/workloads.py), scaled small.
 */
#include "ulib.h"

#define PG 4096u
#define WORDS_PER_PAGE 1024u

static uint32_t mix(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static uint32_t value(uint32_t tag, unsigned page, unsigned word)
{
    return mix(tag * 0x9e3779b9u ^ (page << 12 | word));
}

/* write `words` words spread over each of `pages` pages at addr */
static void fill(uintptr_t addr, unsigned pages, unsigned words, uint32_t tag)
{
    for (unsigned i = 0; i < pages; i++) {
        volatile uint32_t *p = (volatile uint32_t *)(addr + i * PG);
        for (unsigned k = 0; k < words; k++)
            p[k * (WORDS_PER_PAGE / words)] = value(tag, i, k);
    }
}

/* how many of those words do not hold what fill() wrote */
static unsigned check(uintptr_t addr, unsigned pages, unsigned words, uint32_t tag)
{
    unsigned bad = 0;
    for (unsigned i = 0; i < pages; i++) {
        volatile uint32_t *p = (volatile uint32_t *)(addr + i * PG);
        for (unsigned k = 0; k < words; k++)
            bad += p[k * (WORDS_PER_PAGE / words)] != value(tag, i, k);
    }
    return bad;
}

/* how many of those words are not zero */
static unsigned nonzero(uintptr_t addr, unsigned pages, unsigned words)
{
    unsigned n = 0;
    for (unsigned i = 0; i < pages; i++) {
        volatile uint32_t *p = (volatile uint32_t *)(addr + i * PG);
        for (unsigned k = 0; k < words; k++)
            n += p[k * (WORDS_PER_PAGE / words)] != 0;
    }
    return n;
}

/* an order-dependent checksum of the same words */
static uint32_t sum(uintptr_t addr, unsigned pages, unsigned words)
{
    uint32_t s = 0;
    for (unsigned i = 0; i < pages; i++) {
        volatile uint32_t *p = (volatile uint32_t *)(addr + i * PG);
        for (unsigned k = 0; k < words; k++)
            s = mix(s ^ p[k * (WORDS_PER_PAGE / words)]);
    }
    return s;
}

/* brk() the heap up by `pages`; returns the old break, or 0 when refused */
static uintptr_t grow_heap(unsigned pages)
{
    uintptr_t top = u_brk(0);
    if (u_brk(top + pages * PG) != top + pages * PG)
        return 0;
    return top;
}

/* write a stack frame of `pages` pages below the caller's: copy on write after a fork */
static __attribute__((noinline)) uint32_t touch_stack(unsigned pages, uint32_t tag)
{
    volatile uint32_t frame[2 * WORDS_PER_PAGE];
    uint32_t s = 0;
    if (pages > 2)
        pages = 2;
    for (unsigned k = 0; k < pages * WORDS_PER_PAGE; k += 64)
        frame[k] = mix(tag + k);
    for (unsigned k = 0; k < pages * WORDS_PER_PAGE; k += 64)
        s = mix(s ^ frame[k]);
    return s;
}

static __attribute__((noreturn)) void fail(const char *prog, const char *what)
{
    uprintf("%s: %s failed\n", prog, what);
    u_exit(1);
}

/* ------------------------------------------------------------------ demand */
static void demand(unsigned n)
{
    uintptr_t a = u_mmap(n);
    if (a == (uintptr_t)-1)
        fail("demand", "mmap");
    fill(a, n, 8, 1);                                     /* one demand-zero fault per page */
    unsigned bad = check(a, n, 8, 1);
    uprintf("demand: pages=%u sum=%08x bad=%u\n", n, sum(a, n, 8), bad);
    u_exit(bad != 0);
}

/* ---------------------------------------------------------------- forkwait */
static __attribute__((noreturn, noinline)) void forkwait_child(uintptr_t heap, unsigned i)
{
    fill(heap + (i % 4) * PG, 4, 8, 100 + i);             /* copy on write of 4 heap pages */
    uint32_t s = touch_stack(1, 200 + i);                 /* and of the stack */
    s ^= sum(heap, 16, 2);
    uintptr_t x = u_mmap(2);                              /* demand zero */
    if (x == (uintptr_t)-1)
        fail("forkwait child", "mmap");
    fill(x, 2, 8, i);
    s = mix(s ^ sum(x, 2, 8));
    u_exit(s & 0x7f);
}

static void forkwait(unsigned n)
{
    uintptr_t heap = grow_heap(16);
    if (!heap)
        fail("forkwait", "brk");
    fill(heap, 16, 8, 7);
    unsigned total = 0, lost = 0;
    for (unsigned i = 0; i < n; i++) {
        long pid = u_fork();
        if (pid < 0)
            fail("forkwait", "fork");
        if (pid == 0)
            forkwait_child(heap, i);
        int st;
        lost += u_wait(&st) != pid;
        total += (unsigned)st;
    }
    unsigned bad = check(heap, 16, 8, 7);                /* the children's writes must not show */
    uprintf("forkwait: forks=%u status_sum=%u heap_bad=%u lost=%u\n", n, total, bad, lost);
    u_exit(bad || lost);
}

/* ------------------------------------------------------------------ kbuild */
#define CC_HEAP 32        /* pages: 2 source + 28 work + 2 object */
#define CC_PASSES 4

static __attribute__((noreturn)) void run(int prog, long arg, const char *who)
{
    touch_stack(1, (uint32_t)prog);                      /* the child's stack: copy on write */
    u_exec(prog, arg);
    fail(who, "exec");
}

static void make(unsigned n)
{
    uintptr_t heap = grow_heap(5);                       /* the dependency graph */
    if (!heap)
        fail("make", "brk");
    fill(heap, 5, 4, 11);
    unsigned cc_sum = 0, failed = 0;
    for (unsigned i = 0; i < n; i++) {
        failed += check(heap, 5, 4, 11) != 0;
        long pid = u_fork();
        if (pid < 0)
            fail("make", "fork");
        if (pid == 0)
            run(PROG_SH, i, "make");
        touch_stack(1, i);                               /* back in the parent: COW or reuse */
        int st;
        if (u_wait(&st) != pid || st >= 128)
            failed++;
        cc_sum += (unsigned)st;
    }
    long pid = u_fork();
    if (pid < 0)
        fail("make", "fork");
    if (pid == 0)
        run(PROG_LD, (long)(n | cc_sum << 8), "make");
    int st;
    if (u_wait(&st) != pid || st != 0)
        failed++;
    uprintf("make: units=%u cc_status_sum=%u failed=%u\n", n, cc_sum, failed);
    u_exit(failed != 0);
}

static void sh(unsigned i)
{
    uintptr_t heap = grow_heap(2);
    if (!heap)
        fail("sh", "brk");
    fill(heap, 2, 4, 20 + i);
    long pid = u_fork();
    if (pid < 0)
        fail("sh", "fork");
    if (pid == 0)
        run(PROG_CC, i, "sh");
    touch_stack(1, i);
    int st;
    if (u_wait(&st) != pid)
        fail("sh", "wait");
    u_exit(st);
}

static void cc(unsigned i)
{
    uintptr_t heap = grow_heap(CC_HEAP);
    if (!heap)
        fail("cc", "brk");
    volatile uint32_t *src = (volatile uint32_t *)heap;  /* "read" the source: 2 full pages */
    for (unsigned k = 0; k < 2 * WORDS_PER_PAGE; k++)
        src[k] = mix(i * 0x10000u + k);
    uintptr_t work = heap + 2 * PG;
    const unsigned nwork = CC_HEAP - 4;
    uint32_t s = 0;
    for (unsigned p = 0; p < CC_PASSES; p++) {           /* passes over a growing part of the heap */
        unsigned np = nwork * (p + 1) / CC_PASSES;
        for (unsigned pg = 0; pg < np; pg++) {
            volatile uint32_t *w = (volatile uint32_t *)(work + pg * PG);
            for (unsigned k = 0; k < WORDS_PER_PAGE; k += 16)
                w[k] = mix(w[k] ^ src[(pg * 64 + k / 16 + p) % (2 * WORDS_PER_PAGE)]);
        }
        s ^= touch_stack(2, p);
    }
    volatile uint32_t *obj = (volatile uint32_t *)(heap + (CC_HEAP - 2) * PG);
    for (unsigned k = 0; k < 2 * WORDS_PER_PAGE; k += 8)  /* emit the object */
        obj[k] = ((volatile uint32_t *)work)[(k * 7) % (nwork * WORDS_PER_PAGE) & ~15u] ^ mix(k);
    uint32_t o = mix(s ^ sum(heap + (CC_HEAP - 2) * PG, 2, 128));
    uprintf("cc: unit=%u obj=%08x\n", i, o);
    u_exit(o & 0x7f);
}

static void ld(unsigned long arg)
{
    unsigned n = arg & 0xff, objs = (unsigned)(arg >> 8);
    uintptr_t heap = grow_heap(22);
    if (!heap)
        fail("ld", "brk");
    fill(heap, 22, 16, objs);
    uprintf("ld: units=%u objects=%u image=%08x\n", n, objs, sum(heap, 22, 16));
    u_exit(0);
}

/* -------------------------------------------------------------------- fork */
/*
 * lat_proc's loop, plus a check that fork write-protected the parent for real: right after
 * fork the parent stores to a page whose writable translation its TLB holds from just before;
 * the child, running later, must still read the value from before the fork.  Without the TLB
 * flush after write-protecting, the parent's store would land in the frame both share.
 */
static void fork_loop(unsigned n)
{
    uintptr_t heap = grow_heap(17);
    if (!heap)
        fail("fork", "brk");
    fill(heap, 16, 8, 7);
    volatile uint32_t *gen = (volatile uint32_t *)(heap + 16 * PG);
    unsigned lost = 0, stale = 0, total = 0;
    for (unsigned i = 0; i < n; i++) {
        *gen = i;
        long pid = u_fork();
        if (pid < 0)
            fail("fork", "fork");
        if (pid == 0)
            u_exit((int)(*gen & 0x7f));                 /* at once: only fork's own cost */
        *gen = i + 1000;                                 /* copy on write, not a write into the child */
        int st;
        lost += u_wait(&st) != pid;
        stale += (unsigned)st != (i & 0x7f);
        total += (unsigned)st;
    }
    unsigned bad = check(heap, 16, 8, 7);
    uprintf("fork: forks=%u status_sum=%u heap_bad=%u lost=%u stale=%u\n", n, total, bad, lost, stale);
    u_exit(bad || lost || stale);
}

/* ---------------------------------------------------------------- memtouch */
#define MEMTOUCH_WORKERS 4

static __attribute__((noreturn)) void memtouch_worker(unsigned w, unsigned cycles)
{
    uint32_t s = 0;
    unsigned bad = 0, zero_bad = 0;
    for (unsigned c = 0; c < cycles; c++) {
        unsigned np = 8 + (w * 7 + c * 5) % 24;
        uintptr_t a = u_mmap(np);
        if (a == (uintptr_t)-1)
            fail("memtouch", "mmap");
        uint32_t tag = w << 16 | c;
        zero_bad += nonzero(a, np, 16);                  /* fresh memory reads zero (first touch: a read) */
        fill(a, np, 16, tag);
        bad += check(a, np, 16, tag);
        s = mix(s ^ sum(a, np, 16));
        if (u_munmap(a, np))                             /* present ptes go: invlpg each */
            fail("memtouch", "munmap");
        /*
         * mmap is first fit: one page mapped now lands where the first page was, and must read
         * zero; the TLB still holds the old translation unless munmap invalidated it (a process
         * switch would flush it, so this comes before the yield).
         */
        uintptr_t b = u_mmap(1);
        if (b == (uintptr_t)-1)
            fail("memtouch", "mmap");
        zero_bad += nonzero(b, 1, 16);
        if (u_munmap(b, 1))
            fail("memtouch", "munmap");
        u_yield();                                       /* the workers' cycles interleave */
    }
    uprintf("memtouch: worker=%u cycles=%u sum=%08x bad=%u zero_bad=%u\n", w, cycles, s, bad, zero_bad);
    u_exit(bad || zero_bad);
}

static void memtouch(unsigned cycles)
{
    long pids[MEMTOUCH_WORKERS];
    for (unsigned w = 0; w < MEMTOUCH_WORKERS; w++) {
        pids[w] = u_fork();
        if (pids[w] < 0)
            fail("memtouch", "fork");
        if (pids[w] == 0)
            memtouch_worker(w, cycles);
    }
    unsigned failed = 0;
    for (unsigned w = 0; w < MEMTOUCH_WORKERS; w++) {
        int st;
        failed += u_wait(&st) < 0 || st != 0;
    }
    uprintf("memtouch: workers=%u failed=%u\n", MEMTOUCH_WORKERS, failed);
    u_exit(failed != 0);
}

/* ------------------------------------------------------------------ faults */
#define NFAULTS 6

/* the forbidden thing number k; returning means it was allowed */
static void misbehave(unsigned k)
{
    switch (k) {
    case 0: *(volatile uint32_t *)U_IMAGE = 0; break;               /* write to read-only text */
    case 1: (void)*(volatile uint32_t *)0x100000; break;            /* read the kernel (supervisor) */
    case 2: (void)*(volatile uint32_t *)(U_MMAP_BASE - PG); break;  /* read outside every area */
    case 3: *(volatile uint32_t *)(U_STACK_TOP + 16) = 0; break;    /* write above the stack */
    case 4: __asm__ volatile("hlt"); break;                         /* privileged: #GP */
    case 5: __asm__ volatile("cli"); break;                         /* IOPL 0: #GP */
    /* not "out" at IOPL 0: unicorn runs port hooks without the I/O permission check, and the
     * runner stops the machine there rather than deliver a #GP it cannot raise in time */
    }
}

static void faults(void)
{
    unsigned sum = 0, lost = 0;
    for (unsigned k = 0; k < NFAULTS; k++) {
        long pid = u_fork();
        if (pid < 0)
            fail("faults", "fork");
        if (pid == 0) {
            u_yield();                                   /* the parent runs on: nothing to yield to */
            misbehave(k);
            uprintf("faults: case %u was allowed (pid %ld)\n", k, u_getpid());
            u_exit(0);
        }
        int st;
        lost += u_wait(&st) != pid;
        uprintf("faults: case %u status %d\n", k, st);
        sum += (unsigned)st;
    }
    uprintf("faults: cases=%u status_sum=%u lost=%u\n", NFAULTS, sum, lost);
    u_exit(lost != 0);
}

__attribute__((noreturn)) void umain(long prog, long arg)
{
    switch (prog) {
    case PROG_DEMAND: demand((unsigned)arg); break;
    case PROG_FORKWAIT: forkwait((unsigned)arg); break;
    case PROG_MAKE: make((unsigned)arg); break;
    case PROG_SH: sh((unsigned)arg); break;
    case PROG_CC: cc((unsigned)arg); break;
    case PROG_LD: ld((unsigned long)arg); break;
    case PROG_FAULTS: faults(); break;
    case PROG_FORK: fork_loop((unsigned)arg); break;
    case PROG_MEMTOUCH: memtouch((unsigned)arg); break;
    }
    uprintf("umain: no program %ld\n", prog);
    u_exit(126);
}
