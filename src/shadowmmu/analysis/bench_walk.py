"""``shadowmmu bench walk``: page walks per second, per paging mode.

Cold walks (no TLB, A bits already set so a walk writes nothing), TLB hits, and
volatility3's Intel layers translating the same addresses on the same tables.
volatility3 checks no permissions and sets no A/D; ours does both, so the ratio
is conservative for us.  ``memory`` picks the PhysicalMemory backend the
tables live in ("dict" or "mmap"): the walker reaches both through the same
frame views, so their rates should match.
"""

from __future__ import annotations

import random
import time

from ..x86 import Access, PhysicalMemory, Tlb, physical_memory, translate
from ..x86.builder import PageTableBuilder
from ..x86.formats import PagingMode

MODES = (PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4, PagingMode.LEVEL5)


def build_workload(mode: PagingMode, nr_pages: int, seed: int = 1, memory: str = "dict"):
    """Map nr_pages 4K pages at random page-aligned addresses of the mode's
    address space, backed by distinct frames; return (mem, cpu, vaddrs)."""
    rng = random.Random(seed)
    mem = physical_memory(1 << 30, maxphyaddr=40, backend=memory)
    b = PageTableBuilder(mem, mode)
    va_bits = {PagingMode.BITS32: 32, PagingMode.PAE: 32, PagingMode.LEVEL4: 47, PagingMode.LEVEL5: 56}[mode]
    vaddrs = set()
    while len(vaddrs) < nr_pages:
        # clusters of neighbouring pages, as real address spaces have
        base = rng.randrange(0, 1 << (va_bits - 12)) & ~0x3F
        for i in range(min(64, nr_pages - len(vaddrs))):
            vaddrs.add((base + i) << 12)
    vaddrs = sorted(vaddrs)
    data = 1 << 16      # data frames after the tables; tables get the low frames
    for i, va in enumerate(vaddrs):
        b.map(va, (data + i) << 12, 0x67)       # P|W|U|A|D: walks write nothing
    cpu = b.cpu()
    rng.shuffle(vaddrs)
    return mem, cpu, [va | rng.randrange(0, 4096) for va in vaddrs]


def _rate(fn, items, min_time: float = 0.4) -> float:
    n = 0
    t0 = time.perf_counter()
    while True:
        for x in items:
            fn(x)
        n += len(items)
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n / dt


def volatility_layer(mem: PhysicalMemory, cpu, mode: PagingMode):
    """volatility3's Intel layer for this mode over a copy of the low physical memory."""
    try:
        from volatility3.framework import contexts
        from volatility3.framework.layers import intel, physical
    except ImportError:
        return None
    cls = {PagingMode.BITS32: intel.Intel, PagingMode.PAE: intel.IntelPAE,
           PagingMode.LEVEL4: intel.Intel32e}.get(mode)
    if cls is None:
        return None          # volatility3 has no 5-level layer
    top = max(mem.allocated_frames()) + 1
    image = b"".join(mem.frame_bytes(p) for p in range(top))
    ctx = contexts.Context()
    ctx.add_layer(physical.BufferDataLayer(ctx, "bench.phys", "phys", image))
    ctx.config["bench.virt.memory_layer"] = "phys"
    ctx.config["bench.virt.page_map_offset"] = cpu.cr3 & ~0xFFF
    layer = cls(ctx, "bench.virt", "virt")
    ctx.add_layer(layer)
    return layer


def bench_walk(nr_pages: int = 4096, min_time: float = 0.4, memory: str = "dict") -> list[dict]:
    rows = []
    for mode in MODES:
        mem, cpu, vaddrs = build_workload(mode, nr_pages, memory=memory)
        cold = _rate(lambda va: translate(mem, cpu, va, Access.USER), vaddrs, min_time)
        tlb = Tlb()
        for va in vaddrs:
            tlb.translate(mem, cpu, va, Access.USER)
        hits = _rate(lambda va: tlb.translate(mem, cpu, va, Access.USER), vaddrs, min_time)
        row = {"mode": mode.value, "pages": nr_pages, "memory": memory, "cold_walks_per_s": cold,
               "tlb_hits_per_s": hits, "volatility3_per_s": None, "ratio": None}
        layer = volatility_layer(mem, cpu, mode)
        if layer is not None:
            # same answers first, then speed
            for va in vaddrs[:256]:
                ours = translate(mem, cpu, va, Access.USER).paddr
                theirs = layer._translate(va)[0]
                if ours != theirs:
                    raise AssertionError(f"{mode.value}: volatility3 translates {va:#x} to {theirs:#x}, "
                                         f"we to {ours:#x}")
            vol = _rate(layer._translate, vaddrs, min_time)
            row["volatility3_per_s"] = vol
            row["ratio"] = cold / vol
        rows.append(row)
    return rows
