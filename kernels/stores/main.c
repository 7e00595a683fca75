/*
 * stores.c - every kind of store to a guest page table that a hypervisor must emulate exactly.
 *
 * A user page table is set up and used (so a shadow MMU shadows it and write-protects it); then
 * the kernel writes its entries through the identity map with one instruction of each kind: mov,
 * xchg, lock cmpxchg (succeeding and failing), cmpxchg8b, lock or, lock bts, rep stos, rep movs,
 * a 4-byte store into the high half of an 8-byte pte, a 2-byte store straddling two ptes, and an
 * 8-byte store straddling the table's last entry and the next frame.  Before each store the
 * kernel prints its name (the test matches the hypervisor's log of emulated writes to it), after
 * each it prints the entries it touched.  Native and shadow runs must print the same.
 */
#include "kern.h"

#define N 16
static pte_t *pt;                     /* the user page table, through the identity map */
/* the CPU's word: the read-modify-write instructions work on it (on PAE: a pte's low half) */
typedef unsigned long word_t;
#define W(i) (*(volatile word_t *)&pt[i])

/*
 * Touch every user page after a flush: every pte is walked again (A set as the hardware does),
 * and a shadow MMU shadows the table again if the last store made it give up on it (KVM unshadows
 * a table written several times in a row with no fault through it in between).
 */
static pgd_t pgd;
static void refresh(void)
{
    load_cr3(pgd);
    for (int i = 0; i < N; i++)
        if (pt[i] & PTE_P)
            (void)((volatile uint8_t *)(uintptr_t)USER_BASE)[i * PAGE_SIZE];
}

static void show(const char *what, int first, int n)
{
    refresh();
    kprintf("%s:", what);
    for (int i = first; i < first + n; i++)
        kprintf(" %lx", (unsigned long)pt[i]);
    kputs("\n");
}

void ktrap(struct trapframe *tf)
{
    kprintf("stores: unexpected trap %u error %x at %lx\n", (unsigned)tf->vector, (unsigned)tf->error,
            (unsigned long)tf->ip);
    kexit(1);
}

void kmain(struct boot_info *bi)
{
    (void)bi;
    pgd = pgd_new();
    load_cr3(pgd);
    /* map N user pages, touch them all: their table is now in use (and shadowed) */
    for (int i = 0; i < N; i++) {
        pte_t *p = pte_walk(pgd, USER_BASE + i * PAGE_SIZE, 1);
        uintptr_t f = frame_alloc();
        pte_set(p, (pte_t)f | PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D);
    }
    pt = pte_walk(pgd, USER_BASE, 0);
    volatile uint8_t *user = (volatile uint8_t *)(uintptr_t)USER_BASE;
    for (int i = 0; i < N; i++)
        (void)user[i * PAGE_SIZE];
    refresh();
    pte_t v = pt[1] ^ PTE_A;          /* flip A: a harmless change the hypervisor must see */

    kputs("mov\n");
    *(volatile pte_t *)&pt[1] = v;
    show("mov", 1, 1);

    kputs("xchg\n");
    word_t old = W(2) ^ PTE_A;
    __asm__ volatile("xchg %0, %1" : "+r"(old), "+m"(W(2)) :: "memory");
    show("xchg", 2, 1);

    kputs("cmpxchg\n");
    word_t expect = W(3), repl = W(3) ^ PTE_A;
    __asm__ volatile("lock cmpxchg %2, %1" : "+a"(expect), "+m"(W(3)) : "r"(repl) : "memory", "cc");
    show("cmpxchg", 3, 1);

    kputs("cmpxchg-fail\n");
    expect = 0;                       /* not the pte's value: the CPU writes the old value back */
    __asm__ volatile("lock cmpxchg %2, %1" : "+a"(expect), "+m"(W(3)) : "r"(repl) : "memory", "cc");
    show("cmpxchg-fail", 3, 1);

    kputs("cmpxchg8b\n");
    {
        uint32_t *q = (uint32_t *)&pt[4];
        uint32_t lo = q[0], hi = q[1];
        uint32_t nlo = lo ^ PTE_A, nhi = hi;
        __asm__ volatile("lock cmpxchg8b %0" : "+m"(*(volatile uint64_t *)q), "+a"(lo), "+d"(hi)
                         : "b"(nlo), "c"(nhi) : "memory", "cc");
    }
    show("cmpxchg8b", 4, 2);

    kputs("lock-or\n");
    __asm__ volatile("lock or %1, %0" : "+m"(W(6)) : "r"((word_t)PTE_PCD) : "memory", "cc");
    show("lock-or", 6, 1);

    kputs("lock-bts\n");
    __asm__ volatile("lock bts %1, %0" : "+m"(W(7)) : "r"((word_t)3) : "memory", "cc");   /* PWT */
    show("lock-bts", 7, 1);

    kputs("rep-stos\n");
    {
        void *d = &pt[8];
        size_t n = 2 * sizeof(pte_t) / sizeof(word_t);
        word_t val = 0;               /* clear two ptes (on PAE: four halves), as a pte_clear loop does */
        __asm__ volatile("rep stos%z2" : "+D"(d), "+c"(n) : "a"(val) : "memory");
    }
    show("rep-stos", 8, 2);

    kputs("rep-movs\n");
    {
        pte_t src[2] = { pt[11], pt[10] };        /* swap two entries' frames */
        void *d = &pt[10], *s = src;
        size_t n = 2 * sizeof(pte_t);
        __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
    }
    show("rep-movs", 10, 2);

    kputs("high-half\n");
    ((volatile uint32_t *)&pt[12])[sizeof(pte_t) == 8 ? 1 : 0] = (uint32_t)(pt[12] >> (sizeof(pte_t) == 8 ? 32 : 0));
    show("high-half", 12, 1);

    kputs("straddle-ptes\n");
    {
        volatile uint16_t *w = (volatile uint16_t *)((uint8_t *)&pt[14] - 1);
        *w = *w;
    }
    show("straddle-ptes", 13, 2);

    kputs("straddle-frames\n");
    {
        volatile uint64_t *w = (volatile uint64_t *)((uint8_t *)pt + 4092);
        *w = *w;
    }
    refresh();
    kputs("straddle-frames: done\n");

    /* every user page must still map what the table says: read each through the user mapping */
    unsigned sum = 0;
    for (int i = 0; i < N; i++)
        if (pt[i] & PTE_P)
            sum += user[i * PAGE_SIZE + 1] + 1;
    kprintf("stores: sum=%u\n", sum);
    kexit(0);
}
