/*
 * frames.c - the page-frame allocator.
 *
 * Frames come from the usable (type 1) ranges of the multiboot memory map, above 1 MiB (the low
 * megabyte holds the BIOS's and loader's data), outside the kernel image, below MAX_RAM.  Each
 * frame has a 16-bit reference count: 0 = free.  Allocation is next-fit from a cursor, so the
 * sequence of frames handed out is a function of the sequence of calls: runs are reproducible.
 */
#include "kern.h"

#define NFRAMES (MAX_RAM >> PAGE_SHIFT)

static uint8_t usable[NFRAMES / 8];
static uint16_t refs[NFRAMES];
static unsigned long cursor;
unsigned long frames_free, frames_total;

extern uint8_t _kernel_start[], _kernel_end[];

static int is_usable(unsigned long f) { return usable[f >> 3] >> (f & 7) & 1; }

void frames_init(const struct boot_info *bi)
{
    uintptr_t ks = PAGE_ALIGN_DOWN((uintptr_t)_kernel_start), ke = PAGE_ALIGN_UP((uintptr_t)_kernel_end);
    for (unsigned i = 0; i < bi->nranges; i++) {
        uint64_t b = (bi->ranges[i].base + PAGE_SIZE - 1) >> PAGE_SHIFT;
        uint64_t e = (bi->ranges[i].base + bi->ranges[i].len) >> PAGE_SHIFT;
        for (uint64_t f = b; f < e && f < NFRAMES; f++) {
            uintptr_t pa = (uintptr_t)f << PAGE_SHIFT;
            if (pa < 0x100000 || (pa >= ks && pa < ke) || is_usable(f))
                continue;
            usable[f >> 3] |= 1u << (f & 7);
            frames_total++;
        }
    }
    frames_free = frames_total;
    cursor = 0x100000 >> PAGE_SHIFT;
}

uintptr_t frame_alloc(void)
{
    if (!frames_free)
        return 0;
    for (;;) {
        unsigned long f = cursor;
        cursor = cursor + 1 < NFRAMES ? cursor + 1 : 0;
        if (is_usable(f) && !refs[f]) {
            refs[f] = 1;
            frames_free--;
            uintptr_t pa = (uintptr_t)f << PAGE_SHIFT;
            memset((void *)pa, 0, PAGE_SIZE);
            return pa;
        }
    }
}

/*
 * Zero every free frame now, through the identity map (as init_on_free would): under a shadow MMU
 * this touches each 4 KiB piece of the kernel's direct map once, so a frame allocated later costs
 * no hidden fault when it is cleared -- the model's "warm" frames (guest/kernel/boot.py).
 */
void frames_warm(void)
{
    for (unsigned long f = 0; f < NFRAMES; f++)
        if (is_usable(f) && !refs[f])
            memset((void *)((uintptr_t)f << PAGE_SHIFT), 0, PAGE_SIZE);
}

static unsigned long frame_of(uintptr_t pa, const char *what)
{
    unsigned long f = pa >> PAGE_SHIFT;
    if (f >= NFRAMES || !is_usable(f) || !refs[f])
        kpanic("%s: frame %lx is not an allocated frame", what, (unsigned long)pa);
    return f;
}

void frame_get(uintptr_t pa)
{
    unsigned long f = frame_of(pa, "frame_get");
    if (refs[f] == 0xffff)
        kpanic("frame_get: reference count of %lx overflows", (unsigned long)pa);
    refs[f]++;
}

void frame_put(uintptr_t pa)
{
    unsigned long f = frame_of(pa, "frame_put");
    if (!--refs[f])
        frames_free++;
}

unsigned frame_refs(uintptr_t pa)
{
    unsigned long f = pa >> PAGE_SHIFT;
    return f < NFRAMES ? refs[f] : 0;
}
