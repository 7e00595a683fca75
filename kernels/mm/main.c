#include "kern.h"
void ktrap(struct trapframe *tf)
{
    kpanic("trap %u error %x at %lx", (unsigned)tf->vector, (unsigned)tf->error, (unsigned long)tf->ip);
}
void kmain(struct boot_info *bi)
{
    kprintf("hello %s ram_top=%lx frames=%lu cmd='%s'\n", FMT_NAME, (unsigned long)bi->ram_top, frames_total, bi->cmdline);
    pgd_t p = pgd_new();
    pte_t *e = pte_walk(p, USER_BASE + 0x5000, 1);
    uintptr_t f = frame_alloc();
    pte_set(e, f | PTE_P | PTE_RW | PTE_US);
    load_cr3(p);
    *(volatile int *)(USER_BASE + 0x5000) = 42;
    kprintf("wrote %d pt=%lu\n", *(int *)f, pt_pages_allocated);
    __asm__ volatile("int $3");
    kexit(0);
}
