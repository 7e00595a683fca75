/*
 * cpu.c - descriptor tables and the few instructions the runner intercepts by address.
 *
 * GDT slots (kern.h): 0x08 ring-0 code, 0x10 ring-0 data, 0x18 ring-3 code, 0x20 ring-3 data,
 * 0x28 the TSS (8 bytes in 32-bit mode, 16 in IA-32e mode).  The TSS only gives the ring-0 stack
 * for events from ring 3; no hardware task switching, no I/O bitmap.  The IDT holds interrupt
 * gates (IF cleared on entry; nothing interrupts anyway) for vectors 0-31 at DPL 0 and the
 * system-call gate 0x80 at DPL 3 so that ring 3 may use int 0x80.
 */
#include "kern.h"

#if defined(FMT_64)
static uint64_t gdt[7] __attribute__((aligned(16))) = {
    0,
    0x00AF9A000000FFFFull,           /* ring-0 code, L=1 */
    0x00CF92000000FFFFull,           /* ring-0 data */
    0x00AFFA000000FFFFull,           /* ring-3 code, L=1 */
    0x00CFF2000000FFFFull,           /* ring-3 data */
    0, 0,                            /* TSS, 16 bytes */
};
static struct __attribute__((packed)) {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
} tss __attribute__((aligned(16)));
static uint64_t idt[256 * 2] __attribute__((aligned(16)));
#else
static uint64_t gdt[6] __attribute__((aligned(16))) = {
    0,
    0x00CF9A000000FFFFull,           /* ring-0 code */
    0x00CF92000000FFFFull,           /* ring-0 data */
    0x00CFFA000000FFFFull,           /* ring-3 code */
    0x00CFF2000000FFFFull,           /* ring-3 data */
    0,                               /* TSS */
};
static struct __attribute__((packed)) {
    uint32_t link, esp0, ss0, esp1, ss1, esp2, ss2, cr3, eip, eflags;
    uint32_t eax, ecx, edx, ebx, esp, ebp, esi, edi;
    uint32_t es, cs, ss, ds, fs, gs, ldt;
    uint16_t trap, iomap_base;
} tss __attribute__((aligned(16)));
static uint64_t idt[256] __attribute__((aligned(16)));
#endif

extern const uintptr_t trap_vectors[33];

struct __attribute__((packed)) dtr {
    uint16_t limit;
    uintptr_t base;
};

static void set_gate(int vec, uintptr_t handler, int dpl)
{
    /* type 0xE: interrupt gate (32-bit, or 64-bit in IA-32e mode), present */
    uint64_t lo = (handler & 0xffff) | ((uint64_t)SEL_KCODE << 16) |
                  ((uint64_t)(0x8E | (dpl << 5)) << 40) | ((uint64_t)((handler >> 16) & 0xffff) << 48);
#if defined(FMT_64)
    idt[vec * 2] = lo;
    idt[vec * 2 + 1] = (uint64_t)handler >> 32;
#else
    idt[vec] = lo;
#endif
}

void cpu_init(void)
{
    uintptr_t base = (uintptr_t)&tss;
    uint32_t limit = sizeof(tss) - 1;

    memset(&tss, 0, sizeof(tss));
#if defined(FMT_64)
    tss.rsp[0] = (uintptr_t)kstack_top;
#else
    tss.esp0 = (uintptr_t)kstack_top;
    tss.ss0 = SEL_KDATA;
#endif
    tss.iomap_base = sizeof(tss);    /* beyond the limit: no I/O bitmap, ring 3 gets #GP on in/out */
    /* available TSS (type 9), present, DPL 0 */
    gdt[SEL_TSS / 8] = (limit & 0xffff) | ((uint64_t)(base & 0xffffff) << 16) | (0x89ull << 40) |
                       ((uint64_t)(limit >> 16 & 0xf) << 48) | ((uint64_t)(base >> 24 & 0xff) << 56);
#if defined(FMT_64)
    gdt[SEL_TSS / 8 + 1] = (uint64_t)base >> 32;
#endif

    struct dtr g = { sizeof(gdt) - 1, (uintptr_t)gdt };
    __asm__ volatile("lgdt %0" :: "m"(g));
#if defined(FMT_64)
    /* reload CS with a far return, the data segments with their selectors */
    __asm__ volatile("pushq %0\n\t"
                     "leaq 1f(%%rip), %%rax\n\t"
                     "pushq %%rax\n\t"
                     "lretq\n"
                     "1:\n\t"
                     "movw %w1, %%ds\n\t"
                     "movw %w1, %%es\n\t"
                     "movw %w1, %%ss\n\t"
                     :: "i"(SEL_KCODE), "r"(SEL_KDATA) : "rax", "memory");
#else
    /*
     * DS/ES/FS/GS hold the ring-3 data selector for good: it is flat like the ring-0 one and usable
     * at CPL 0, and iret to ring 3 would null a DPL-0 data selector.  SS is the ring-0 one.
     */
    __asm__ volatile("ljmp %0, $1f\n"
                     "1:\n\t"
                     "movw %w1, %%ss\n\t"
                     "movw %w2, %%ds\n\t"
                     "movw %w2, %%es\n\t"
                     "movw %w2, %%fs\n\t"
                     "movw %w2, %%gs\n\t"
                     :: "i"(SEL_KCODE), "r"(SEL_KDATA), "r"(SEL_UDATA) : "memory");
#endif
    __asm__ volatile("ltr %w0" :: "r"(SEL_TSS));

    for (int v = 0; v < 32; v++)
        set_gate(v, trap_vectors[v], 0);
    set_gate(T_SYSCALL, trap_vectors[32], 3);
    struct dtr i = { sizeof(idt) - 1, (uintptr_t)idt };
    __asm__ volatile("lidt %0" :: "m"(i));
}

void trapframe_user(struct trapframe *tf, uintptr_t ip, uintptr_t sp)
{
    memset(tf, 0, sizeof(*tf));
    tf->ip = ip;
    tf->cs = SEL_UCODE;
    tf->flags = 0x202;               /* IF and the always-one bit 1 */
    tf->sp = sp;
    tf->ss = SEL_UDATA;
}

/* ------------------------------------------------ the intercepted instructions, one site each */
pgd_t cr3_loaded;

void load_cr3(pgd_t pgd)
{
    __asm__ volatile("mov %0, %%cr3" :: "r"(pgd) : "memory");
    cr3_loaded = pgd;
}

pgd_t read_cr3(void)
{
    uintptr_t v;
    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}

uintptr_t read_cr2(void)
{
    uintptr_t v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}

void invlpg(uintptr_t va)
{
    __asm__ volatile("invlpg (%0)" :: "r"(va) : "memory");
}

uintptr_t read_cr0(void)
{
    uintptr_t v;
    __asm__ volatile("mov %%cr0, %0" : "=r"(v));
    return v;
}

void write_cr0(uintptr_t v)
{
    __asm__ volatile("mov %0, %%cr0" :: "r"(v) : "memory");
}

uintptr_t read_cr4(void)
{
    uintptr_t v;
    __asm__ volatile("mov %%cr4, %0" : "=r"(v));
    return v;
}

void write_cr4(uintptr_t v)
{
    __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory");
}
