/*
 * kern.h - the shared library of the shadowmmu guest kernels (kernels/lib/).
 *
 * One source, three paging formats, chosen at compile time:
 *   -DFMT_32   32-bit paging, 4 MiB PSE pages for the kernel's identity map, 4-byte ptes
 *   -DFMT_PAE  PAE paging, 2 MiB pages, 8-byte ptes written as two 4-byte halves
 *              (i386 Linux style) unless -DPTE64, which writes them with one 8-byte store
 *   -DFMT_64   IA-32e (long mode) 4-level paging, 2 MiB pages, 8-byte ptes
 *              (with -DLA57: 5-level paging, CR4.LA57 set by boot.S before paging is turned on)
 *
 * What the library gives a kernel (see each section below):
 *   boot        multiboot v1 header, entry at 1 MiB, paging on, GDT/TSS/IDT loaded, then
 *               kmain(struct boot_info *) is called on the kernel stack.
 *   traps       every exception 0-31 and int 0x80 reach ktrap(struct trapframe *), which the kernel
 *               defines; returning from it resumes the (possibly modified) frame with iret.
 *   serial      kputc/kputs/kprintf (%d %u %x %lx %s %c %p, width and 0 flag), kexit(code) via port 0xf4.
 *   frames      a page-frame allocator over the multiboot memory map, with a reference count per frame.
 *   paging      pte helpers per format; address spaces: new/free/walk; the identity map is supervisor-only.
 *
 * Memory layout (the same for every format, so kernels and their output do not depend on it):
 *   0 .. min(RAM, 256 MiB)             identity map, supervisor-only, large pages (kernel + frames)
 *   USER_BASE (1 GiB) .. USER_END (2 GiB)  user space, 4 KiB pages, one address space per process
 */
#ifndef KERN_H
#define KERN_H

#include <stdint.h>
#include <stddef.h>
#include <stdarg.h>

#if !defined(FMT_32) && !defined(FMT_PAE) && !defined(FMT_64)
#error "define one of FMT_32, FMT_PAE, FMT_64"
#endif

/* ---------------------------------------------------------------- formats */
#if defined(FMT_64) && defined(LA57)
typedef uint64_t pte_t;
#define PT_LEVELS 5
#define FMT_NAME "la57"
#elif defined(FMT_64)
typedef uint64_t pte_t;
#define PT_LEVELS 4
#define FMT_NAME "64"
#elif defined(FMT_PAE)
typedef uint64_t pte_t;
#define PT_LEVELS 3
#define FMT_NAME "pae"
#else
typedef uint32_t pte_t;
#define PT_LEVELS 2
#define FMT_NAME "32"
#endif

#define PAGE_SIZE 4096u
#define PAGE_SHIFT 12
#define PAGE_ALIGN_DOWN(x) ((x) & ~(uintptr_t)(PAGE_SIZE - 1))
#define PAGE_ALIGN_UP(x) (((x) + PAGE_SIZE - 1) & ~(uintptr_t)(PAGE_SIZE - 1))

#define PTE_P   0x001u
#define PTE_RW  0x002u
#define PTE_US  0x004u
#define PTE_PWT 0x008u
#define PTE_PCD 0x010u
#define PTE_A   0x020u
#define PTE_D   0x040u
#define PTE_PS  0x080u
#define PTE_G   0x100u
#if defined(FMT_32)
#define PTE_ADDR_MASK ((pte_t)0xfffff000u)
#else
#define PTE_ADDR_MASK ((pte_t)0x000ffffffffff000ull)
#endif
#define PTE_FLAGS(e) ((e) & ~PTE_ADDR_MASK)
#define PTE_ADDR(e) ((uintptr_t)((e) & PTE_ADDR_MASK))

/* #PF error code bits */
#define PF_P 1u
#define PF_W 2u
#define PF_U 4u
#define PF_RSVD 8u
#define PF_I 16u

#define USER_BASE 0x40000000u
#define USER_END  0x80000000u
#define MAX_RAM   (256u << 20)        /* frames above this are not managed */

/* GDT selectors (the same slots in every format) */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UCODE (0x18 | 3)
#define SEL_UDATA (0x20 | 3)
#define SEL_TSS   0x28

/* ---------------------------------------------------------------- boot */
struct mmap_range { uint64_t base, len; };
#define BOOT_MAX_RANGES 32
#define BOOT_CMDLINE_MAX 256

struct boot_info {
    uint64_t ram_top;                 /* end of the highest usable RAM range (capped at MAX_RAM) */
    unsigned nranges;                 /* usable RAM ranges from the multiboot memory map (type 1) */
    struct mmap_range ranges[BOOT_MAX_RANGES];
    char cmdline[BOOT_CMDLINE_MAX];   /* copied: the multiboot info may lie in a frame we hand out */
};

extern struct boot_info boot_info;
void kmain(struct boot_info *bi);     /* defined by each kernel; must not return (call kexit) */

/* the command line's words after the first (the image path): returns the number found */
int cmdline_args(const char *cmdline, const char *argv[], int max, char *buf, size_t bufsize);
int katoi(const char *s, int dflt);   /* decimal; dflt when s is NULL, empty or not a number */

/* ---------------------------------------------------------------- traps */
#if defined(FMT_64)
struct trapframe {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error;
    uint64_t ip, cs, flags, sp, ss;   /* pushed by the CPU (always, in IA-32e mode) */
};
#define TF_RET(tf) ((tf)->rax)
#define TF_ARG0(tf) ((tf)->rdi)
#define TF_ARG1(tf) ((tf)->rsi)
#define TF_ARG2(tf) ((tf)->rdx)
#define TF_RET2(tf) ((tf)->rdx)
#else
struct trapframe {
    uint32_t edi, esi, ebp, esp_unused, ebx, edx, ecx, eax;    /* pushal */
    uint32_t vector, error;
    uint32_t ip, cs, flags, sp, ss;   /* sp, ss pushed only on a change of privilege */
};
#define TF_RET(tf) ((tf)->eax)
#define TF_ARG0(tf) ((tf)->ebx)
#define TF_ARG1(tf) ((tf)->ecx)
#define TF_ARG2(tf) ((tf)->edx)
#define TF_RET2(tf) ((tf)->edx)
#endif
#define TF_FROM_USER(tf) (((tf)->cs & 3) == 3)
#define T_SYSCALL 0x80
#define T_PF 14

void ktrap(struct trapframe *tf);     /* defined by each kernel */
/* a fresh ring-3 frame: ip, sp, flags IF|bit1, user selectors, all general registers 0 */
void trapframe_user(struct trapframe *tf, uintptr_t ip, uintptr_t sp);
/* leave the kernel into a frame built by hand (never returns): used to start the first process */
__attribute__((noreturn)) void trap_return(struct trapframe *tf);

extern uint8_t kstack_top[];          /* the one kernel stack; TSS.ESP0/RSP0 point here */

/* ---------------------------------------------------------------- serial / exit */
void kputc(char c);
void kputs(const char *s);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* the formatter behind kprintf; the user library uses the same one */
void vformat(void (*out)(char, void *), void *arg, const char *fmt, va_list ap);
__attribute__((noreturn)) void kexit(int code);          /* outb(0xf4, code), then halt */
__attribute__((noreturn)) void kpanic(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---------------------------------------------------------------- frames */
/* physical frames are identity-mapped: the kernel reaches frame f at address f */
void frames_warm(void);               /* zero every free frame now (the model's warm frames) */
uintptr_t frame_alloc(void);           /* a zeroed frame with refcount 1, or 0 when memory is out */
void frame_get(uintptr_t pa);          /* refcount += 1 */
void frame_put(uintptr_t pa);          /* refcount -= 1; freed at 0 */
unsigned frame_refs(uintptr_t pa);
extern unsigned long frames_free;      /* how many frames are free now */
extern unsigned long frames_total;     /* how many frames the allocator manages */

/* ---------------------------------------------------------------- paging */
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/*
 * Writing a pte.  On PAE (without PTE64) a pte is set as i386 Linux sets it: the high half first,
 * then the low half that holds P, so the CPU never sees a present entry with a stale high half;
 * and cleared low half first for the same reason.  PTE64 writes one 8-byte store (cmpxchg8b: a
 * 32-bit CPU has no other 8-byte general-register store).
 */
static inline void pte_set(pte_t *p, pte_t v)
{
#if defined(FMT_PAE) && !defined(PTE64)
    volatile uint32_t *h = (volatile uint32_t *)p;
    h[1] = (uint32_t)(v >> 32);
    barrier();
    h[0] = (uint32_t)v;
#elif defined(FMT_PAE)
    uint64_t old = *(volatile uint64_t *)p;
    __asm__ volatile("1: cmpxchg8b %0\n\tjnz 1b"
                     : "+m"(*p), "+A"(old)
                     : "b"((uint32_t)v), "c"((uint32_t)(v >> 32))
                     : "memory", "cc");
#else
    *(volatile pte_t *)p = v;
#endif
}

static inline void pte_clear(pte_t *p)
{
#if defined(FMT_PAE) && !defined(PTE64)
    volatile uint32_t *h = (volatile uint32_t *)p;
    h[0] = 0;
    barrier();
    h[1] = 0;
#else
    pte_set(p, 0);
#endif
}

static inline pte_t pte_get(const pte_t *p)
{
#if defined(FMT_PAE)
    /* two loads; the kernel is the only writer of its tables (the CPU only sets A/D in the low half) */
    const volatile uint32_t *h = (const volatile uint32_t *)p;
    uint32_t lo = h[0], hi = h[1];
    return ((pte_t)hi << 32) | lo;
#else
    return *(const volatile pte_t *)p;
#endif
}

/* the page-table root of an address space: the physical address loaded into CR3 */
typedef uintptr_t pgd_t;

extern pgd_t kernel_pgd;              /* the kernel-only address space (identity map) */
extern unsigned long pt_pages_allocated;  /* paging-structure pages allocated for address spaces */

pgd_t pgd_new(void);                  /* an address space with the kernel map and an empty user part; 0 if OOM */
/*
 * Free an address space: every user pte's frame is frame_put, every user table freed, then the root.
 * It must not be the one in CR3.
 */
void pgd_free(pgd_t pgd);
/*
 * The leaf pte of va (a user address) in pgd: NULL if a table on the way is missing and alloc is 0,
 * or if a table cannot be allocated.  New tables are P|RW|US (PAE PDPTEs: P only).
 */
pte_t *pte_walk(pgd_t pgd, uintptr_t va, int alloc);
/*
 * Visit every present user pte (in address order): fn(va, pte pointer, arg).  Used by fork and exit.
 */
void pte_foreach(pgd_t pgd, void (*fn)(uintptr_t va, pte_t *pte, void *arg), void *arg);

/* ---------------------------------------------------------------- CPU */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
/* these live in paging.c and cpu.c only: the runner finds sensitive instructions in the image */
void load_cr3(pgd_t pgd);            /* also flushes the TLB's (non-global) entries */
extern pgd_t cr3_loaded;              /* what load_cr3 last loaded: reading CR3 back costs an exit */
pgd_t read_cr3(void);
uintptr_t read_cr2(void);
void invlpg(uintptr_t va);
uintptr_t read_cr0(void);
void write_cr0(uintptr_t v);
uintptr_t read_cr4(void);
void write_cr4(uintptr_t v);
void cpu_init(void);                  /* GDT, TSS, IDT (called by lib_start) */

/* ---------------------------------------------------------------- string */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

#endif
