/*
 * paging.c - page tables in the three formats, behind one generic walker.
 *
 * Level 0 is the root (CR3).  Per format: shift of the address bits each level indexes, and how
 * many entries it has.  The kernel part of every address space is shared, never copied per
 * process except on 32-bit paging, where it lives in the root itself:
 *   32   root = page directory; PDEs 0..n are 4 MiB kernel pages (copied into each root)
 *   pae  root = PDPT (4 entries); PDPT[0] -> the kernel page directory (2 MiB pages),
 *        PDPT[1] -> the process's page directory, allocated with the root: a PDPTE is loaded at
 *        CR3 load only, so it must never be added to a live root
 *   64   root = PML4; PML4[0] -> the process's PDPT, whose [0] -> the kernel page directory
 *        (with LA57 the root is a PML5 whose [0] -> the process's PML4, whose [0] -> its PDPT)
 *        (2 MiB pages) and [1] -> the process's page directory
 */
#include "kern.h"

#if defined(FMT_64) && defined(LA57)
static const unsigned lvl_shift[PT_LEVELS] = { 48, 39, 30, 21, 12 };
static const unsigned lvl_nent[PT_LEVELS] = { 512, 512, 512, 512, 512 };
#define LARGE_SHIFT 21
#elif defined(FMT_64)
static const unsigned lvl_shift[PT_LEVELS] = { 39, 30, 21, 12 };
static const unsigned lvl_nent[PT_LEVELS] = { 512, 512, 512, 512 };
#define LARGE_SHIFT 21
#elif defined(FMT_PAE)
static const unsigned lvl_shift[PT_LEVELS] = { 30, 21, 12 };
static const unsigned lvl_nent[PT_LEVELS] = { 4, 512, 512 };
#define LARGE_SHIFT 21
#else
static const unsigned lvl_shift[PT_LEVELS] = { 22, 12 };
static const unsigned lvl_nent[PT_LEVELS] = { 1024, 1024 };
#define LARGE_SHIFT 22
#endif

#define CR0_WP 0x00010000u
#define CR0_PG 0x80000000u
#define CR4_PSE 0x10u
#define CR4_PAE 0x20u

pgd_t kernel_pgd;
unsigned long pt_pages_allocated;
#if !defined(FMT_32)
static uintptr_t kernel_pd;          /* pae, 64: the shared kernel page directory */
#endif
static unsigned nkernel;             /* large pages in the identity map */

static inline unsigned idx(int level, uintptr_t va) { return (va >> lvl_shift[level]) & (lvl_nent[level] - 1); }

/* what a table entry pointing to a lower table holds; PAE PDPTEs have no RW/US (reserved bits) */
static inline pte_t table_flags(int level)
{
#if defined(FMT_PAE)
    if (level == 0)
        return PTE_P;
#endif
    (void)level;
    return PTE_P | PTE_RW | PTE_US;
}

static uintptr_t table_alloc(void)
{
    uintptr_t pa = frame_alloc();
    if (pa)
        pt_pages_allocated++;
    return pa;
}

void paging_init(uint64_t ram_top)
{
    nkernel = (unsigned)((ram_top + (1ull << LARGE_SHIFT) - 1) >> LARGE_SHIFT);
#if defined(FMT_32)
    kernel_pgd = frame_alloc();
    pte_t *pd = (pte_t *)kernel_pgd;
    for (unsigned i = 0; i < nkernel; i++)
        pd[i] = ((pte_t)i << LARGE_SHIFT) | PTE_P | PTE_RW | PTE_PS;
    write_cr4(read_cr4() | CR4_PSE);
    load_cr3(kernel_pgd);
    write_cr0(read_cr0() | CR0_PG | CR0_WP);
#else
    kernel_pd = frame_alloc();
    kernel_pgd = frame_alloc();
    if (!kernel_pd || !kernel_pgd)
        kpanic("paging_init: no frames");
    pte_t *pd = (pte_t *)kernel_pd;
    for (unsigned i = 0; i < nkernel; i++)
        pd[i] = ((pte_t)i << LARGE_SHIFT) | PTE_P | PTE_RW | PTE_PS;
#if defined(FMT_PAE)
    ((pte_t *)kernel_pgd)[0] = kernel_pd | PTE_P;
    write_cr4(read_cr4() | CR4_PAE);
    load_cr3(kernel_pgd);
    write_cr0(read_cr0() | CR0_PG | CR0_WP);
#else
    uintptr_t pdpt = frame_alloc();
    if (!pdpt)
        kpanic("paging_init: no frames");
    ((pte_t *)pdpt)[0] = kernel_pd | PTE_P | PTE_RW;
#if defined(LA57)
    uintptr_t pml4 = frame_alloc();  /* 5-level: the root is a PML5, [0] -> this PML4 */
    if (!pml4)
        kpanic("paging_init: no frames");
    ((pte_t *)pml4)[0] = pdpt | PTE_P | PTE_RW;
    ((pte_t *)kernel_pgd)[0] = pml4 | PTE_P | PTE_RW;
#else
    ((pte_t *)kernel_pgd)[0] = pdpt | PTE_P | PTE_RW;
#endif
    load_cr3(kernel_pgd);            /* leaves boot.S's 1 GiB boot map for the map of RAM only */
#endif
#endif
}

pgd_t pgd_new(void)
{
    uintptr_t root = table_alloc();
    if (!root)
        return 0;
    pte_t *r = (pte_t *)root;
#if defined(FMT_32)
    const pte_t *k = (const pte_t *)kernel_pgd;
    for (unsigned i = 0; i < nkernel; i++)
        r[i] = k[i];
#elif defined(FMT_PAE)
    uintptr_t upd = table_alloc();
    if (!upd) {
        frame_put(root);
        return 0;
    }
    r[0] = kernel_pd | PTE_P;
    r[idx(0, USER_BASE)] = upd | PTE_P;
#else
    uintptr_t pdpt = table_alloc();
    if (!pdpt) {
        frame_put(root);
        return 0;
    }
    ((pte_t *)pdpt)[0] = kernel_pd | PTE_P | PTE_RW;
#if defined(LA57)
    uintptr_t pml4 = table_alloc();  /* the process's PML4 under PML5[0], freed by pgd_free's walk */
    if (!pml4) {
        frame_put(pdpt);
        frame_put(root);
        return 0;
    }
    ((pte_t *)pml4)[0] = pdpt | PTE_P | PTE_RW | PTE_US;
    r[0] = pml4 | PTE_P | PTE_RW | PTE_US;
#else
    r[0] = pdpt | PTE_P | PTE_RW | PTE_US;
#endif
#endif
    return root;
}

pte_t *pte_walk(pgd_t pgd, uintptr_t va, int alloc)
{
    if (va < USER_BASE || va >= USER_END)
        return 0;
    pte_t *t = (pte_t *)pgd;
    for (int l = 0; l < PT_LEVELS - 1; l++) {
        pte_t *e = &t[idx(l, va)];
        pte_t v = pte_get(e);
        if (!(v & PTE_P)) {
            if (!alloc)
                return 0;
            uintptr_t pa = table_alloc();
            if (!pa)
                return 0;
            v = (pte_t)pa | table_flags(l);
            pte_set(e, v);           /* not-present -> present: no TLB entry to invalidate */
        }
#if defined(FMT_PAE)
        if (l > 0 && (v & PTE_PS))   /* bit 7 of a PAE PDPTE is reserved, not PS */
            return 0;
#else
        if (v & PTE_PS)
            return 0;
#endif
        t = (pte_t *)PTE_ADDR(v);
    }
    return &t[idx(PT_LEVELS - 1, va)];
}

/* does [va, va + 2^shift) meet the user range? */
static int in_user(uint64_t va, unsigned shift)
{
    return va + (1ull << shift) > USER_BASE && va < USER_END;
}

static void foreach_level(pte_t *t, int l, uint64_t base, void (*fn)(uintptr_t, pte_t *, void *), void *arg)
{
    for (unsigned i = 0; i < lvl_nent[l]; i++) {
        uint64_t va = base + ((uint64_t)i << lvl_shift[l]);
        if (!in_user(va, lvl_shift[l]))
            continue;
        pte_t v = pte_get(&t[i]);
        if (!(v & PTE_P))
            continue;
        if (l == PT_LEVELS - 1)
            fn((uintptr_t)va, &t[i], arg);
        else if (!(v & PTE_PS))
            foreach_level((pte_t *)PTE_ADDR(v), l + 1, va, fn, arg);
    }
}

void pte_foreach(pgd_t pgd, void (*fn)(uintptr_t va, pte_t *pte, void *arg), void *arg)
{
    foreach_level((pte_t *)pgd, 0, 0, fn, arg);
}

static void free_level(pte_t *t, int l, uint64_t base)
{
    for (unsigned i = 0; i < lvl_nent[l]; i++) {
        uint64_t va = base + ((uint64_t)i << lvl_shift[l]);
        if (!in_user(va, lvl_shift[l]))
            continue;
        pte_t v = pte_get(&t[i]);
        if (!(v & PTE_P))
            continue;
        if (l < PT_LEVELS - 1) {
            if (v & PTE_PS)
                continue;
            free_level((pte_t *)PTE_ADDR(v), l + 1, va);
        }
        frame_put(PTE_ADDR(v));
        /* no invalidation: this address space is not in CR3 (pgd_free's rule), and CR3 loads flush */
        pte_clear(&t[i]);
    }
}

void pgd_free(pgd_t pgd)
{
    if (pgd == cr3_loaded)
        kpanic("pgd_free: %lx is the live address space", (unsigned long)pgd);
    free_level((pte_t *)pgd, 0, 0);
    frame_put(pgd);
}
