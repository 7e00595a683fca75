/*
 * boot.c - from boot.S to kmain: read the multiboot info, start the frame allocator, turn on
 * paging (or, in 64-bit, replace the boot map), load the descriptor tables.
 */
#include "kern.h"

#define MB_INFO_MAGIC 0x2BADB002u

struct boot_info boot_info;

void frames_init(const struct boot_info *bi);
void paging_init(uint64_t ram_top);
void lib_start(uint32_t magic, uint32_t info);

static void add_range(uint64_t base, uint64_t len)
{
    if (base >= MAX_RAM || boot_info.nranges == BOOT_MAX_RANGES)
        return;
    if (base + len > MAX_RAM)
        len = MAX_RAM - base;
    boot_info.ranges[boot_info.nranges].base = base;
    boot_info.ranges[boot_info.nranges].len = len;
    boot_info.nranges++;
    if (base + len > boot_info.ram_top)
        boot_info.ram_top = base + len;
}

static void read_multiboot(uint32_t info)
{
    const uint32_t *mb = (const uint32_t *)(uintptr_t)info;
    uint32_t flags = mb[0];
    if (flags & (1u << 2)) {                 /* cmdline */
        const char *s = (const char *)(uintptr_t)mb[4];
        size_t i = 0;
        for (; s[i] && i < BOOT_CMDLINE_MAX - 1; i++)
            boot_info.cmdline[i] = s[i];
        boot_info.cmdline[i] = 0;
    }
    if (flags & (1u << 6)) {                 /* memory map: size, base (u64), len (u64), type */
        uintptr_t p = mb[12], end = p + mb[11];
        while (p < end) {
            const uint8_t *e = (const uint8_t *)p;
            uint32_t size = *(const uint32_t *)e;
            uint64_t base = *(const uint64_t *)(e + 4), len = *(const uint64_t *)(e + 12);
            uint32_t type = *(const uint32_t *)(e + 20);
            if (type == 1)
                add_range(base, len);
            p += size + 4;
        }
    } else if (flags & 1u) {                 /* only mem_lower/mem_upper: RAM from 1 MiB */
        add_range(0x100000, (uint64_t)mb[2] << 10);
    }
}

void lib_start(uint32_t magic, uint32_t info)
{
    if (magic != MB_INFO_MAGIC) {
        kprintf("boot: bad multiboot magic %x\n", magic);
        kexit(1);
    }
    outb(0x21, 0xff);                        /* mask the PICs: nothing may interrupt */
    outb(0xa1, 0xff);
    read_multiboot(info);
    if (!boot_info.nranges) {
        kputs("boot: no memory information from the loader\n");
        kexit(1);
    }
    frames_init(&boot_info);
    paging_init(boot_info.ram_top);
    cpu_init();
    kmain(&boot_info);
    kpanic("kmain returned");
}

int cmdline_args(const char *cmdline, const char *argv[], int max, char *buf, size_t bufsize)
{
    size_t n = 0;
    int argc = 0, word = -1;                 /* word 0 is the image path: skipped */
    const char *s = cmdline;
    while (*s) {
        while (*s == ' ')
            s++;
        if (!*s)
            break;
        word++;
        const char *w = s;
        while (*s && *s != ' ')
            s++;
        if (word == 0)
            continue;
        size_t len = (size_t)(s - w);
        if (argc == max || n + len + 1 > bufsize)
            break;
        memcpy(buf + n, w, len);
        buf[n + len] = 0;
        argv[argc++] = buf + n;
        n += len + 1;
    }
    return argc;
}

int katoi(const char *s, int dflt)
{
    if (!s || !*s)
        return dflt;
    int v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return dflt;
        v = v * 10 + (*s - '0');
    }
    return v;
}
