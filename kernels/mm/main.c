/*
 * main.c - mm: a small Unix-like kernel for the shadow MMU to run.
 *
 * Processes run in ring 3, each in its own address space (its own root in CR3).  They enter the
 * kernel only through int 0x80 and exceptions; there is no timer, so the scheduler switches
 * processes only inside system calls (wait, exit, yield), round robin.  One kernel stack serves
 * everyone: a process's registers live in its struct proc while it is not running, and a switch
 * copies the next process's frame over the one the trap stub will iret from.
 *
 * Memory is managed as Linux does it, in miniature: a process has a few areas (vmas); anonymous
 * ones get a zeroed frame on the first touch (demand zero); fork shares every frame, write-
 * protecting the private ones on both sides, and the first write fault on a shared frame copies
 * it (or, when the faulting process is its last user, just makes it writable again).  A pte is
 * always written with A set, and D set when the fault was a write; the faulting instruction is
 * then retried by iret.
 *
 * TLB: invlpg after a present pte changes or goes (copy on write, munmap, brk), a CR3 load after
 * fork write-protects the parent, nothing when a pte becomes present (not-present entries are
 * never cached).  The fork and memtouch programs check the first two from user space: a native
 * run (a real TLB) prints stale=/zero_bad= counts other than 0 if either is left out.
 */
#include "kern.h"
#include "mm.h"

#define NPROC 16
#define NVMA 8

#define VM_WRITE 1
#define VM_ANON 2                    /* demand zero: a not-present page gets a fresh zeroed frame */

enum { P_FREE, P_RUNNABLE, P_WAITING, P_ZOMBIE };

struct vma {
    uintptr_t start, end;            /* [start, end), page-aligned */
    int flags;
};

struct proc {
    int state, pid, parent;          /* parent: a slot index, -1 for none */
    int status;                      /* exit status, while a zombie */
    pgd_t pgd;
    struct trapframe tf;             /* the registers while not running */
    struct vma vma[NVMA];
    int nvma;
};

enum { VMA_TEXT, VMA_DATA, VMA_HEAP, VMA_STACK, VMA_FIRST_MMAP };

static struct proc procs[NPROC];
static int cur = -1;                 /* the running process's slot */
static int first_pid, first_status = -1;  /* the process kmain started: its status is the run's */
static int next_pid = 1;

static struct {
    unsigned long demand, cow_copy, cow_reuse, forks, execs, exits, killed, syscalls;
    unsigned long ptes_at_exit, accessed_at_exit, dirty_at_exit;
} count;

extern const uint8_t user_image[], user_image_end[];
static const struct uhdr *uhdr;

static const char *const prog_names[NPROGS] = { "demand", "forkwait", "kbuild", "sh", "cc", "ld", "faults", "fork", "memtouch" };

/* ------------------------------------------------------------------ areas */
static struct vma *find_vma(struct proc *p, uintptr_t va)
{
    for (int i = 0; i < p->nvma; i++)
        if (va >= p->vma[i].start && va < p->vma[i].end)
            return &p->vma[i];
    return 0;
}

/* drop the pages of [start, end) from the live address space of p (brk shrinking) */
static void unmap_range(struct proc *p, uintptr_t start, uintptr_t end)
{
    for (uintptr_t va = start; va < end; va += PAGE_SIZE) {
        pte_t *e = pte_walk(p->pgd, va, 0);
        if (!e)
            continue;
        pte_t v = pte_get(e);
        if (!(v & PTE_P))
            continue;
        pte_clear(e);
        invlpg(va);                  /* a present pte went away: its TLB entry must too */
        frame_put(PTE_ADDR(v));
    }
}

/* ------------------------------------------------------------------ faults */
/*
 * Resolve a fault of p at va (write: a write access).  Returns 0 when resolved (the instruction
 * can be retried), -1 when the access is not allowed (the process gets killed), -2 when memory
 * is out.
 */
static int handle_fault(struct proc *p, uintptr_t va, int write)
{
    struct vma *vma = find_vma(p, va);
    if (!vma || (write && !(vma->flags & VM_WRITE)))
        return -1;
    va = PAGE_ALIGN_DOWN(va);
    pte_t *e = pte_walk(p->pgd, va, 1);
    if (!e)
        return -2;
    pte_t v = pte_get(e);
    if (!(v & PTE_P)) {
        if (!(vma->flags & VM_ANON))
            return -1;               /* image pages are all mapped at exec: nothing to bring in */
        uintptr_t pa = frame_alloc();
        if (!pa)
            return -2;
        pte_t flags = PTE_P | PTE_US | PTE_A;
        if (vma->flags & VM_WRITE)
            flags |= PTE_RW;
        if (write)
            flags |= PTE_D;
        pte_set(e, (pte_t)pa | flags);   /* not present before: no TLB entry to invalidate */
        count.demand++;
        return 0;
    }
    if (write && !(v & PTE_RW)) {
        uintptr_t old = PTE_ADDR(v);
        if (frame_refs(old) == 1) {
            pte_set(e, v | PTE_RW | PTE_A | PTE_D);     /* the last user: take it back */
            count.cow_reuse++;
        } else {
            uintptr_t pa = frame_alloc();
            if (!pa)
                return -2;
            memcpy((void *)pa, (const void *)old, PAGE_SIZE);
            pte_set(e, (pte_t)pa | PTE_FLAGS(v) | PTE_RW | PTE_A | PTE_D);
            frame_put(old);
            count.cow_copy++;
        }
        invlpg(va);                  /* the read-only translation may be cached */
        return 0;
    }
    /*
     * The pte allows the access: the CPU faulted on a stale TLB entry, which can only happen if
     * this kernel forgot an invalidation.  Say so loudly rather than hide it.
     */
    kpanic("pid %d: fault at %lx (write=%d) but pte %llx allows it: a missing TLB invalidation",
           p->pid, (unsigned long)va, write, (unsigned long long)v);
}

/* ------------------------------------------------------------------ processes */
static int alloc_proc(void)
{
    for (int i = 0; i < NPROC; i++)
        if (procs[i].state == P_FREE) {
            memset(&procs[i], 0, sizeof(procs[i]));
            procs[i].pid = next_pid++;
            procs[i].parent = -1;
            return i;
        }
    return -1;
}

/* load an address space; a CR3 load also flushes the TLB (no global pages here), which fork relies on */
static void switch_mm(pgd_t pgd)
{
    load_cr3(pgd);
}

/* the address space's root is freed only once no CPU register points to it */
static void drop_mm(struct proc *p)
{
    if (!p->pgd)
        return;
    if (cr3_loaded == p->pgd)
        switch_mm(kernel_pgd);
    pgd_free(p->pgd);
    p->pgd = 0;
}

/*
 * Replace p's memory by a fresh copy of the user image and start program prog(arg) in it.
 * Text and data pages are copied in now (the image is in the kernel, there is no file to page
 * from); bss beyond the last data page, the heap, the stack and mmap areas are demand zero.
 */
static int do_exec(struct proc *p, int prog, long arg)
{
    if (prog < 0 || prog >= NPROGS)
        return -1;
    pgd_t pgd = pgd_new();
    if (!pgd)
        return -2;
    uintptr_t image_len = (uintptr_t)(user_image_end - user_image);
    uintptr_t data_end = PAGE_ALIGN_UP(uhdr->data_end);
    for (uintptr_t va = U_IMAGE; va < data_end; va += PAGE_SIZE) {
        pte_t *e = pte_walk(pgd, va, 1);
        uintptr_t pa = e ? frame_alloc() : 0;
        if (!pa) {
            pgd_free(pgd);
            return -2;
        }
        uintptr_t off = va - U_IMAGE;
        if (off < image_len)
            memcpy((void *)pa, user_image + off, image_len - off < PAGE_SIZE ? image_len - off : PAGE_SIZE);
        pte_t flags = PTE_P | PTE_US | PTE_A;
        if (va >= uhdr->text_end)
            flags |= PTE_RW;
        pte_set(e, (pte_t)pa | flags);
    }
    drop_mm(p);
    p->pgd = pgd;
    p->nvma = VMA_FIRST_MMAP;
    p->vma[VMA_TEXT] = (struct vma){ U_IMAGE, uhdr->text_end, 0 };
    p->vma[VMA_DATA] = (struct vma){ uhdr->text_end, data_end, VM_WRITE };
    p->vma[VMA_HEAP] = (struct vma){ data_end, PAGE_ALIGN_UP(uhdr->bss_end), VM_WRITE | VM_ANON };
    p->vma[VMA_STACK] = (struct vma){ U_STACK_TOP - U_STACK_PAGES * PAGE_SIZE, U_STACK_TOP, VM_WRITE | VM_ANON };
    trapframe_user(&p->tf, uhdr->entry, U_STACK_TOP);
    TF_ARG0(&p->tf) = (uintptr_t)prog;
    TF_ARG1(&p->tf) = (uintptr_t)arg;
    count.execs++;
    return 0;
}

/* fork's pass over the parent's ptes: share every frame, write-protect the private ones */
struct fork_ctx { pgd_t child; int oom; };

static void fork_pte(uintptr_t va, pte_t *e, void *arg)
{
    struct fork_ctx *c = arg;
    if (c->oom)
        return;
    pte_t *ce = pte_walk(c->child, va, 1);
    if (!ce) {
        c->oom = 1;
        return;
    }
    pte_t v = pte_get(e);
    if (v & PTE_RW) {
        v &= ~(pte_t)PTE_RW;
        pte_set(e, v);               /* invalidated for the whole space once all are done */
    }
    frame_get(PTE_ADDR(v));
    pte_set(ce, v & ~(pte_t)PTE_A);  /* the child has not used it yet */
}

static long do_fork(struct proc *p)
{
    int ci = alloc_proc();
    if (ci < 0)
        return -1;
    struct proc *c = &procs[ci];
    c->pgd = pgd_new();
    if (!c->pgd) {
        c->state = P_FREE;
        return -1;
    }
    struct fork_ctx ctx = { c->pgd, 0 };
    pte_foreach(p->pgd, fork_pte, &ctx);
    switch_mm(p->pgd);               /* the parent's writable translations are stale now: flush */
    if (ctx.oom) {                   /* what was shared stays shared: COW sorts it out later */
        pgd_free(c->pgd);
        c->state = P_FREE;
        return -1;
    }
    memcpy(c->vma, p->vma, sizeof(c->vma));
    c->nvma = p->nvma;
    c->tf = p->tf;
    TF_RET(&c->tf) = 0;
    c->parent = (int)(p - procs);
    c->state = P_RUNNABLE;
    count.forks++;
    return c->pid;
}

static void finish(void);

/* run the next runnable process after cur, round robin; none left: the end */
static void schedule(void)
{
    for (int k = 1; k <= NPROC; k++) {
        int i = (cur + k + NPROC) % NPROC;
        if (procs[i].state == P_RUNNABLE) {
            cur = i;
            return;
        }
    }
    for (int i = 0; i < NPROC; i++)
        if (procs[i].state != P_FREE)
            kpanic("deadlock: no runnable process, pid %d is in state %d", procs[i].pid, procs[i].state);
    finish();
}

static void reap(struct proc *z)
{
    z->state = P_FREE;
}

/*
 * A census of a dying process's ptes: the A and D bits the CPU (or a shadow MMU on its behalf)
 * set must be the same whatever runs underneath, so they are counted and printed at the end.
 */
static void census(uintptr_t va, pte_t *e, void *arg)
{
    (void)va, (void)arg;
    pte_t v = pte_get(e);
    count.ptes_at_exit++;
    count.accessed_at_exit += (v & PTE_A) != 0;
    count.dirty_at_exit += (v & PTE_D) != 0;
}

static void do_exit(struct proc *p, int status)
{
    int me = (int)(p - procs);
    if (p->pgd)
        pte_foreach(p->pgd, census, 0);
    drop_mm(p);
    for (int i = 0; i < NPROC; i++)  /* orphans: nobody will wait for them */
        if (procs[i].state != P_FREE && procs[i].parent == me) {
            procs[i].parent = -1;
            if (procs[i].state == P_ZOMBIE)
                reap(&procs[i]);
        }
    count.exits++;
    if (p->pid == first_pid)
        first_status = status;
    struct proc *par = p->parent >= 0 ? &procs[p->parent] : 0;
    if (!par) {
        reap(p);
    } else if (par->state == P_WAITING) {
        TF_RET(&par->tf) = (uintptr_t)p->pid;
        TF_RET2(&par->tf) = (uintptr_t)status;
        par->state = P_RUNNABLE;
        reap(p);
    } else {
        p->status = status;
        p->state = P_ZOMBIE;
    }
    schedule();
}

static void do_wait(struct proc *p)
{
    int me = (int)(p - procs), children = 0;
    for (int i = 0; i < NPROC; i++) {
        if (procs[i].state == P_FREE || procs[i].parent != me)
            continue;
        if (procs[i].state == P_ZOMBIE) {
            TF_RET(&p->tf) = (uintptr_t)procs[i].pid;
            TF_RET2(&p->tf) = (uintptr_t)procs[i].status;
            reap(&procs[i]);
            return;
        }
        children++;
    }
    if (!children) {
        TF_RET(&p->tf) = (uintptr_t)-1;
        return;
    }
    p->state = P_WAITING;            /* the child's exit fills in the result */
    schedule();
}

/* ------------------------------------------------------------------ system calls */
static long do_brk(struct proc *p, uintptr_t addr)
{
    struct vma *h = &p->vma[VMA_HEAP];
    if (addr == 0)
        return (long)h->end;
    uintptr_t end = PAGE_ALIGN_UP(addr);
    if (addr < h->start || end > U_MMAP_BASE)
        return (long)h->end;
    if (end < h->end)
        unmap_range(p, end, h->end);
    h->end = end;
    return (long)end;
}

/*
 * mmap: the lowest gap of npages pages above U_MMAP_BASE, first fit, so that addresses freed by
 * munmap are used again (as Linux does): a missing invlpg at munmap would then leave the old
 * frame visible at the new mapping, and the program would see it.
 */
#define MMAP_LIMIT (U_STACK_TOP - U_STACK_PAGES * PAGE_SIZE - PAGE_SIZE)  /* a guard page below the stack */

static long do_mmap(struct proc *p, long npages)
{
    if (npages <= 0 || npages > (long)((MMAP_LIMIT - U_MMAP_BASE) >> PAGE_SHIFT))
        return -1;
    uintptr_t len = (uintptr_t)npages << PAGE_SHIFT, a = U_MMAP_BASE;
    for (int i = VMA_FIRST_MMAP; i < p->nvma; i++)
        if (a < p->vma[i].end && p->vma[i].start < a + len) {
            a = p->vma[i].end;       /* overlaps: try just after this area, from the first one again */
            i = VMA_FIRST_MMAP - 1;
        }
    if (a + len > MMAP_LIMIT)
        return -1;
    for (int i = VMA_FIRST_MMAP; i < p->nvma; i++)
        if (p->vma[i].end == a) {
            p->vma[i].end = a + len; /* grow the area just below instead of using a slot */
            return (long)a;
        }
    if (p->nvma == NVMA)
        return -1;
    p->vma[p->nvma++] = (struct vma){ a, a + len, VM_WRITE | VM_ANON };
    return (long)a;
}

/* unmap [addr, addr + npages pages) when it lies in one mmap area: the area shrinks, is split or goes */
static long do_munmap(struct proc *p, uintptr_t addr, long npages)
{
    uintptr_t len = (uintptr_t)npages << PAGE_SHIFT, end = addr + len;
    if (npages <= 0 || addr & (PAGE_SIZE - 1) || end < addr)
        return -1;
    for (int i = VMA_FIRST_MMAP; i < p->nvma; i++) {
        struct vma *v = &p->vma[i];
        if (addr < v->start || end > v->end)
            continue;
        if (addr > v->start && end < v->end) {           /* the middle: split in two */
            if (p->nvma == NVMA)
                return -1;
            p->vma[p->nvma++] = (struct vma){ end, v->end, v->flags };
            v->end = addr;
        } else if (addr > v->start) {
            v->end = addr;
        } else if (end < v->end) {
            v->start = end;
        } else {
            *v = p->vma[--p->nvma];                      /* the whole area: its slot goes */
        }
        unmap_range(p, addr, end);
        return 0;
    }
    return -1;
}

/* copy the user's bytes to the serial port through the identity map, faulting pages in as needed */
static long do_write(struct proc *p, uintptr_t buf, long len)
{
    if (len < 0 || len > 4096)
        return -1;
    for (long done = 0; done < len;) {
        uintptr_t va = buf + (uintptr_t)done;
        pte_t *e = pte_walk(p->pgd, va, 0);
        if (!e || !(pte_get(e) & PTE_P)) {
            if (handle_fault(p, va, 0))
                return -1;
            e = pte_walk(p->pgd, va, 0);
        }
        pte_t v = pte_get(e);
        if (!(v & PTE_US))
            return -1;
        long n = (long)(PAGE_SIZE - (va & (PAGE_SIZE - 1)));
        if (n > len - done)
            n = len - done;
        const char *s = (const char *)(PTE_ADDR(v) + (va & (PAGE_SIZE - 1)));
        for (long k = 0; k < n; k++)
            kputc(s[k]);
        done += n;
    }
    return len;
}

static void kill(struct proc *p, const char *why, struct trapframe *tf, uintptr_t addr)
{
    kprintf("mm: pid %d killed: %s at %lx (ip %lx, error %x)\n", p->pid, why, (unsigned long)addr,
            (unsigned long)tf->ip, (unsigned)tf->error);
    count.killed++;
    do_exit(p, 128 + (int)tf->vector);
}

static void syscall(struct proc *p)
{
    struct trapframe *tf = &p->tf;
    uintptr_t a0 = TF_ARG0(tf), a1 = TF_ARG1(tf);
    long r = 0;
    count.syscalls++;
    switch (TF_RET(tf)) {
    case SYS_EXIT:
        do_exit(p, (int)a0);
        return;
    case SYS_FORK:
        r = do_fork(p);
        break;
    case SYS_EXEC:
        r = do_exec(p, (int)a0, (long)a1);
        if (r == 0)
            return;                  /* a new frame: nothing to return into */
        r = -1;
        break;
    case SYS_WAIT:
        do_wait(p);
        return;
    case SYS_BRK:
        r = do_brk(p, a0);
        break;
    case SYS_MMAP:
        r = do_mmap(p, (long)a0);
        break;
    case SYS_WRITE:
        r = do_write(p, a0, (long)a1);
        break;
    case SYS_GETPID:
        r = p->pid;
        break;
    case SYS_MUNMAP:
        r = do_munmap(p, a0, (long)a1);
        break;
    case SYS_YIELD:
        TF_RET(tf) = 0;
        schedule();
        return;
    default:
        r = -1;
        break;
    }
    TF_RET(tf) = (uintptr_t)r;
}

void ktrap(struct trapframe *tf)
{
    if (!TF_FROM_USER(tf) || cur < 0) {
        uintptr_t cr2 = tf->vector == T_PF ? read_cr2() : 0;
        kpanic("kernel trap %u, error %x, ip %lx, cr2 %lx", (unsigned)tf->vector, (unsigned)tf->error,
               (unsigned long)tf->ip, (unsigned long)cr2);
    }
    struct proc *p = &procs[cur];
    p->tf = *tf;
    if (tf->vector == T_SYSCALL) {
        syscall(p);
    } else if (tf->vector == T_PF) {
        uintptr_t addr = read_cr2();
        int r = handle_fault(p, addr, (tf->error & PF_W) != 0);
        if (r == -2)
            kill(p, "out of memory", tf, addr);
        else if (r)
            kill(p, "bad page fault", tf, addr);
    } else {
        kill(p, tf->vector == 13 ? "general protection fault" : tf->vector == 6 ? "invalid opcode" : "exception",
             tf, tf->ip);
    }
    struct proc *n = &procs[cur];    /* cur may have changed: resume whoever runs now */
    if (cr3_loaded != n->pgd)          /* a switch, or exec's new address space */
        switch_mm(n->pgd);
    *tf = n->tf;
}

/* ------------------------------------------------------------------ start and end */
static unsigned long frames_at_start;

static void finish(void)
{
    kprintf("mm: demand_faults=%lu cow_faults=%lu cow_copies=%lu cow_reuses=%lu pt_pages=%lu "
            "forks=%lu execs=%lu exits=%lu killed=%lu syscalls=%lu\n",
            count.demand, count.cow_copy + count.cow_reuse, count.cow_copy, count.cow_reuse,
            pt_pages_allocated, count.forks, count.execs, count.exits, count.killed, count.syscalls);
    kprintf("mm: at exit: ptes=%lu accessed=%lu dirty=%lu\n", count.ptes_at_exit, count.accessed_at_exit,
            count.dirty_at_exit);
    int ok = 1;
    if (first_status != 0) {
        kprintf("mm: error: the first process exited with status %d\n", first_status);
        ok = 0;
    }
    if (frames_free != frames_at_start) {
        kprintf("mm: error: %ld frames leaked\n", (long)(frames_at_start - frames_free));
        ok = 0;
    }
    kexit(ok ? 0 : 1);
}

void kmain(struct boot_info *bi)
{
    static const struct { const char *name; int prog, dflt; } cmds[] = {
        { "demand", PROG_DEMAND, 200 }, { "forkwait", PROG_FORKWAIT, 50 }, { "kbuild", PROG_MAKE, 4 },
        { "faults", PROG_FAULTS, 0 }, { "fork", PROG_FORK, 50 }, { "memtouch", PROG_MEMTOUCH, 20 },
    };
    const char *argv[4];
    char buf[BOOT_CMDLINE_MAX];
    int argc = cmdline_args(bi->cmdline, argv, 4, buf, sizeof(buf));
    int warm = argc > 2 && !strcmp(argv[argc - 1], "warm");    /* "PROGRAM N warm": see frames_warm */
    if (warm)
        argc--;

    uhdr = (const struct uhdr *)user_image;
    if (uhdr->magic != UHDR_MAGIC)
        kpanic("the user image has no header");
    int which = -1;
    for (unsigned i = 0; argc > 0 && i < sizeof(cmds) / sizeof(cmds[0]); i++)
        if (!strcmp(argv[0], cmds[i].name))
            which = (int)i;
    if (which < 0) {
        kprintf("mm: usage: demand [N] | forkwait [N] | kbuild [N] | fork [N] | memtouch [N] | faults (got '%s')\n", argc ? argv[0] : "");
        kexit(1);
    }
    int n = katoi(argc > 1 ? argv[1] : 0, -1);
    if (argc > 1 && n < 0) {
        kprintf("mm: %s: N must be a decimal number, got '%s'\n", cmds[which].name, argv[1]);
        kexit(1);
    }
    if (argc < 2)
        n = cmds[which].dflt;
    if (cmds[which].prog == PROG_DEMAND && n < 1) {
        kprintf("mm: demand: N must be at least 1, got %d\n", n);
        kexit(1);
    }
    if (cmds[which].prog == PROG_MAKE && n > 255) {
        kprintf("mm: kbuild: N must be at most 255, got %d\n", n);
        kexit(1);
    }
    if (warm)
        frames_warm();
    kprintf("mm: format=%s program=%s n=%d frames=%s\n", FMT_NAME, cmds[which].name, n, warm ? "warm" : "cold");
    frames_at_start = frames_free;

    int i = alloc_proc();
    if (do_exec(&procs[i], cmds[which].prog, n))
        kpanic("cannot start %s: out of memory", prog_names[cmds[which].prog]);
    procs[i].state = P_RUNNABLE;
    first_pid = procs[i].pid;
    cur = i;
    switch_mm(procs[i].pgd);
    trap_return(&procs[i].tf);
}
