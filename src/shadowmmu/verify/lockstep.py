"""Lockstep: one guest program on a native VM and on a shadow VM, compared.

The shadow MMU is correct when the guest cannot tell it is there: every value
read, every fault delivered (address and error code), every #GP, every MMIO
access a device sees, and every byte of guest memory, A and D bits included,
must be what native paging allows.  ``audit()`` runs after every step on the
shadow side, and the dirty log is checked against what native paging changed.
With policy "tdp" the second VM runs two-dimensional paging (mmu/tdp.py) instead
of a shadow MMU, checked the same way.

Programs are data: a list of ops over a small world (three address spaces, two
vCPUs, a pool of page-table frames and data frames, an identity-mapped kernel
window through which CPL0 stores edit the tables, an MMIO device).  The
generator draws from a ``Chooser`` (``choosers``), so the same generator serves
a seeded campaign (``RandomChooser``) and hypothesis (``HypothesisChooser``,
which then shrinks a failing program).  Besides single random ops it emits short
*scenarios*, each aimed at an MMU path that random ops reach too rarely: user
code writing a page table, a flood of pte writes, a write to the upper half of a
32-bit table, a paging-mode change with shadow pages cached across it, a pte
write on one vCPU while the other holds the translation.

TLB latitude.  The guest may omit INVLPG or a flush after changing an entry; the
SDM then allows the old translation or the new one, and nothing else.  The
native VM's TLB holds the old one exactly when a real TLB could; a fresh walk
gives the new one (a TLB may drop an entry at any time).  So a step is accepted
when the shadow side's outcome equals the native outcome with native's TLB as it
is, or, failing that, the native outcome after dropping native's cached
translations for that vCPU (native's state is rolled back and the step re-run,
so both sides continue from the same choice)::

    shadow outcome == native(TLB as is)          -> accept
    else: roll native back, flush its TLB, re-run
          shadow outcome == native(fresh walks)  -> accept (the new translation)
    else (out-of-sync shadows only): for each translation the vCPU *could* hold
          shadow outcome == native(that one cached) -> accept (a speculative fill)
    else                                         -> divergence

Out-of-sync shadows use more of the latitude than a TLB that caches only what it
used: an spte one vCPU's fault or a prefetch installed serves every vCPU, so a
vCPU may see an old translation it never touched.  The SDM allows that too: a
processor may cache any translation that is valid, at any time, speculatively
(SDM 4.10.2.3), and keeps it until it invalidates that page.  So for these
policies each native vCPU's TLB (``LatitudeTlb``) also keeps, per 4 KB page, every
translation that was valid since its last invalidation of the page (recorded
before each op that may change a translation), and a step is accepted if the
shadow's outcome is native's with one of them cached.  An invalidation empties
the set, so a vCPU that invalidates must see the new translation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from itertools import product

from ..mmu.audit import AuditError, probe_cpu
from ..mmu.policy import parse_policy
from ..x86.bits import CR0_PG, CR0_WP, CR4_PGE, CR4_PKE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_NXE
from ..x86.builder import control_registers
from ..x86.bits import PTE_A
from ..x86.faults import GeneralProtection, PageFault
from ..x86.tlb import Tlb
from ..x86.walker import translate
from ..x86.formats import GUEST_MODES, PagingMode
from ..vm.vm import VM
from .choosers import Chooser, RandomChooser

RAM_SIZE = 16 << 20
WINDOW_PAGES = 0x80              # gva 0..512K identity-mapped for the kernel: tables and data live here
GUESTS = {name: PagingMode.parse(name) for name in GUEST_MODES}      # every paging format, by its CLI name
NR_VCPUS = 2

# frames (gfns) of the world
ROOTS = (0x10, 0x11, 0x16)       # three address spaces (PAE: the PDPT pages)
WINDOW_TABLES = (0x12, 0x13, 0x14, 0x15)
POOL = tuple(range(0x20, 0x30))  # page tables the program links and edits
DATA = tuple(range(0x30, 0x38))
# large-page targets: aligned for 2M/4M (0x200, 0x400), misaligned (reserved bits
# 13..20 set), 0 for a 1 GB page (gva offsets below 16 MB stay in RAM)
LARGE_FRAMES = (0x200, 0x400, 0x201, 0x0)
MMIO_GFN = 0xFEE00               # a device page beyond RAM (an xAPIC-like register page)
UNBACKED_GFN = 0x8000            # 128 MB: no memslot, no device (reads all ones, drops writes)

# flag bits the generator combines
P, W, U, A, D, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63
PKEY_SHIFT = 59


# ------------------------------------------------------------------ the world
# Per level, top first, the entry indices test addresses use: both halves of
# 1024-entry tables (all four quadrants of a 32-bit directory, both of a page
# table), all four PAE PDPTEs, the top and the kernel half of 4/5-level tables.
_INDICES = {
    PagingMode.BITS32: ((1, 300, 600, 1023), (0, 1, 512, 1023)),
    PagingMode.PAE: ((1, 2, 3, 0), (1, 511), (0, 1, 511)),
    PagingMode.LEVEL4: ((1, 256, 511), (0, 1, 511), (0, 1), (0, 1, 511)),
    PagingMode.LEVEL5: ((1, 256, 511), (0, 1), (0, 1), (0, 1), (0, 1, 511)),
}
_SHIFTS = {
    PagingMode.BITS32: (22, 12),
    PagingMode.PAE: (30, 21, 12),
    PagingMode.LEVEL4: (39, 30, 21, 12),
    PagingMode.LEVEL5: (48, 39, 30, 21, 12),
}
_VA_BITS = {PagingMode.BITS32: 32, PagingMode.PAE: 32, PagingMode.LEVEL4: 48, PagingMode.LEVEL5: 57}


def _canonical(va: int, bits: int) -> int:
    if bits > 32 and va >> (bits - 1) & 1:
        va |= ((1 << 64) - 1) & ~((1 << bits) - 1)
    return va


def compose_va(mode: PagingMode, indices) -> int:
    va = 0
    for idx, shift in zip(indices, _SHIFTS[mode]):
        va |= idx << shift
    return _canonical(va, _VA_BITS[mode])


def entry_indices(mode: PagingMode) -> tuple[int, ...]:
    return tuple(sorted({i for level in _INDICES[mode] for i in level}))


def _window_chain(mode: PagingMode) -> int:
    return {PagingMode.BITS32: 1, PagingMode.PAE: 2, PagingMode.LEVEL4: 3, PagingMode.LEVEL5: 4}[mode]


def build_world(vm: VM, mode: PagingMode) -> None:
    """Initial memory (a boot loader's work, before the guest runs), then paging on
    on every vCPU."""
    g = vm.gmem
    wide = mode is not PagingMode.BITS32
    esz = 8 if wide else 4
    put = g.write_u64 if wide else g.write_u32
    for root in ROOTS:
        put(root << 12, (WINDOW_TABLES[0] << 12) | (P if mode is PagingMode.PAE else P | W | A))
    # the window: gva == gpa for the first WINDOW_PAGES frames, supervisor, RW, A|D;
    # a chain of window tables below the root, one per remaining level
    chain = _window_chain(mode)
    for upper, lower in zip(WINDOW_TABLES[:chain - 1], WINDOW_TABLES[1:chain]):
        put(upper << 12, (lower << 12) | P | W | A)
    pt = WINDOW_TABLES[chain - 1]
    for gfn in range(WINDOW_PAGES):
        put((pt << 12) + gfn * esz, (gfn << 12) | P | W | A | D)
    for i, gfn in enumerate(DATA):
        g.write_u64(gfn << 12, 0x1111111111111111 * (i + 1))
    # the test tree: test addresses mapped, tables shared where paths meet
    for (table, idx), target in initial_tree(mode).items():
        flags = P if (mode is PagingMode.PAE and table in ROOTS) else P | W | U | A
        put((table << 12) + idx * esz, (target << 12) | flags)
    regs = control_registers(mode, ROOTS[0] << 12, wp=True, nxe=wide, pse=True)
    for v in vm.vcpus:
        v.setup_paging(**regs)


def initial_tree(mode: PagingMode) -> dict[tuple[int, int], int]:
    """(table gfn, index) -> target gfn of the initial test mapping.  Tables are
    assigned from POOL level by level; the first two tables of a level get
    children, and the second shares one lower table with the first (two upper
    entries, one lower table).  Index 0 of the top level belongs to the window."""
    levels = _INDICES[mode]
    tree: dict[tuple[int, int], int] = {}
    pool = list(POOL)
    tables = [ROOTS[0]]
    for depth, choices in enumerate(levels):
        last = depth == len(levels) - 1
        nxt = []
        for t_i, table in enumerate(tables):
            for c_i, idx in enumerate(choices):
                if depth == 0 and idx == 0:
                    continue
                if last:
                    target = DATA[(t_i * len(choices) + c_i) % len(DATA)]
                elif t_i and c_i == 0:
                    target = nxt[0]              # shared lower table
                else:
                    target = pool.pop(0) if pool else POOL[-1]
                    nxt.append(target)
                tree[(table, idx)] = target
        tables = nxt[:2]
    for (table, idx), target in list(tree.items()):
        if table == ROOTS[0]:
            tree[(ROOTS[1], idx)] = target       # a second address space over the same tables
    return tree


def _protected(mode: PagingMode, table: int, idx: int) -> bool:
    """Entries the kernel window rests on: the program never overwrites them
    (it could, and both sides would agree, but the rest of the program would be
    wasted: every later table edit would fault)."""
    chain = WINDOW_TABLES[:_window_chain(mode)]
    return (table in ROOTS or table in chain[:-1]) and idx == 0 or table == chain[-1] and idx < WINDOW_PAGES


# ------------------------------------------------------------------ programs
@dataclass(frozen=True)
class Op:
    kind: str
    args: tuple = ()
    vcpu: int = 0

    def __str__(self) -> str:
        def fmt(a):
            return hex(a) if isinstance(a, int) and not isinstance(a, bool) and a > 9 else str(a)
        at = f"@{self.vcpu}" if self.vcpu else ""
        return f"{self.kind}{at}({', '.join(fmt(a) for a in self.args)})"


class Generator:
    """Random programs for one paging format.  ``generate()`` returns a list of
    ops: one random op, or a short scenario aimed at one MMU path."""

    def __init__(self, ch: Chooser, mode: PagingMode):
        self.ch = ch
        self.mode = mode
        self.wide = mode is not PagingMode.BITS32
        self.long = mode in (PagingMode.LEVEL4, PagingMode.LEVEL5)
        self.esz = 8 if self.wide else 4
        self.tree = initial_tree(mode)
        self.tree_keys = sorted(self.tree)
        self.levels = len(_INDICES[mode])

    # --- building blocks -------------------------------------------------------
    def va(self) -> int:
        ch = self.ch
        return compose_va(self.mode, [ch.choice(c) for c in _INDICES[self.mode]])

    def vcpu(self) -> int:
        return 1 if self.ch.chance(0.3) else 0

    def flags(self, *, pdpte: bool = False, leaf: bool = True) -> int:
        ch = self.ch
        flags = P if ch.chance(0.9) else 0
        if pdpte:
            return flags                          # a PAE PDPTE: W/U/A/D/NX are reserved there
        for bit, p in ((W, 0.7), (U, 0.7), (A, 0.8), (D, 0.6)):
            flags |= bit if ch.chance(p) else 0
        if leaf and ch.chance(0.15):
            flags |= G
        if self.wide and ch.chance(0.15):
            flags |= NX
        if self.long and leaf and ch.chance(0.15):
            flags |= ch.choice((1, 2, 5, 15)) << PKEY_SHIFT
        return flags

    def target(self) -> int:
        ch = self.ch
        r = ch.choice(range(20))
        if r == 0:
            return MMIO_GFN
        if r == 1:
            return UNBACKED_GFN
        return ch.choice(POOL + DATA + ROOTS)

    def junk(self, value: int) -> int:
        """Now and then a reserved bit (address bits above MAXPHYADDR, bit 52,
        PS-page low address bits)."""
        if self.ch.chance(0.05):
            value |= self.ch.choice((1 << 45, 1 << 52, 1 << 13, 1 << 21) if self.wide else (1 << 21, 1 << 13))
        return value

    def entry_write(self, table: int, idx: int, value: int, vcpu: int) -> Op:
        addr = (table << 12) + idx * self.esz
        size = self.esz
        if self.ch.chance(0.08):                 # partial, straddling and short writes
            size, delta = self.ch.choice(((4, 0), (4, 4), (2, 0), (8, 4), (1, 0), (8, 2)) if self.wide
                                         else ((2, 0), (8, 0), (4, 2), (1, 3)))
            addr += delta
        return Op("write_entry", (addr, value & ((1 << (8 * size)) - 1), size), vcpu)

    def random_entry(self) -> tuple[int, int]:
        ch = self.ch
        while True:
            if ch.chance(0.7):
                table, idx = ch.choice(self.tree_keys)
            else:
                table = ch.choice(ROOTS + POOL + (WINDOW_TABLES[0],))
                idx = ch.choice(entry_indices(self.mode))
            if not _protected(self.mode, table, idx):
                return table, idx

    def maybe_invalidate(self, va: int, vcpu: int) -> list[Op]:
        """The TLB latitude: half the time the guest does not invalidate."""
        ch = self.ch
        r = ch.choice(range(10))
        if r < 5:
            return []
        if r < 7:
            return [Op("invlpg", (va,), vcpu)]
        if r < 8:
            return [Op("shootdown", ("invlpg", va))]
        if r < 9:
            return [Op("flush", (), vcpu)]
        return [Op("shootdown", ("flush", 0))]

    def access(self, va: int | None = None, vcpu: int | None = None, kind: str | None = None,
               cpl: int | None = None) -> Op:
        ch = self.ch
        va = (self.va() if va is None else va) | ch.choice((0, 8, 0xFF8, 0xFFC, 0xFFE))
        if self.long and ch.chance(0.03):
            va ^= 1 << 62                        # not canonical: #GP, never a walk
        cpl = ch.choice((0, 3)) if cpl is None else cpl
        kind = ch.choice(("read", "read", "store", "fetch")) if kind is None else kind
        vcpu = self.vcpu() if vcpu is None else vcpu
        size = ch.choice((8, 4, 1, 2))
        if kind == "store":
            value = ch.choice(range(1, 256)) * 0x0101010101010101 & ((1 << 8 * size) - 1)
            return Op("store", (va, cpl, size, value), vcpu)
        return Op(kind, (va, cpl, size), vcpu)

    def mapping(self, va: int, level: int, value: int, vcpu: int) -> Op:
        """The guest's own set_pte: walk its tables to ``level`` for ``va`` and write it."""
        return Op("map", (va, level, value), vcpu)

    # --- ops and scenarios -------------------------------------------------------
    def generate(self) -> list[Op]:
        ch = self.ch
        r = ch.choice(range(100))
        if r < 24:                               # edit a paging entry through the kernel window
            table, idx = self.random_entry()
            pdpte = self.mode is PagingMode.PAE and table in ROOTS
            target = self.tree.get((table, idx), DATA[0]) if ch.chance(0.6) else self.target()
            flags = self.flags(pdpte=pdpte)
            if ch.chance(0.1) and not pdpte:
                target, flags = ch.choice(LARGE_FRAMES), flags | PS
            v = self.vcpu()
            return [self.entry_write(table, idx, self.junk((target << 12) | flags), v)] + \
                self.maybe_invalidate(self.va(), v)
        if r < 56:                               # an access in the test region
            return [self.access()]
        if r < 62:                               # the guest's set_pte at a test address
            va, v = self.va(), self.vcpu()
            level = 1
            flags = self.flags()
            target = ch.choice(DATA) if ch.chance(0.6) else self.target()
            if ch.chance(0.15):
                level = ch.choice((2, 3) if self.long else (2,))
                target, flags = ch.choice(LARGE_FRAMES), flags | PS
            return [self.mapping(va, level, self.junk((target << 12) | flags), v)] + self.maybe_invalidate(va, v)
        if r < 84:
            return self.scenario()
        return [self.mode_op()]

    def mode_op(self) -> Op:
        ch = self.ch
        v = self.vcpu()
        options = ["cr3", "cr3", "wp", "ac", "smep_smap", "pge", "paging_off", "dirty_log", "flush", "bad_cr"]
        if self.wide:
            options.append("nxe")
        if self.long:
            options += ["pke", "pkru"]
        if self.mode is PagingMode.BITS32:
            options.append("pse")
        kind = ch.choice(options)
        if kind == "cr3":
            return Op("cr3", (ch.choice(ROOTS),), v)
        if kind in ("wp", "ac", "pge", "nxe", "pke", "pse"):
            return Op(kind, (ch.chance(0.5),), v)
        if kind == "smep_smap":
            return Op(kind, (ch.chance(0.5), ch.chance(0.5)), v)
        if kind == "pkru":
            return Op("pkru", (ch.choice((0, 0x4, 0x8, 0xC, 0x55555554, 0x0C0C)),), v)
        if kind == "bad_cr":
            return Op("bad_cr", (ch.choice(("lme", "la57", "pg_no_pe", "cr3_high", "no_pae")),), v)
        if kind == "paging_off":
            gfn = ch.choice(DATA + POOL + (MMIO_GFN,))
            return Op("paging_off", (ch.choice(("read", "store")), (gfn << 12) | ch.choice((0, 8, 0xFF8))), v)
        if kind == "dirty_log":
            return Op("dirty_log", (ch.choice(("on", "get", "get", "off")),))
        return Op("flush", (), v)

    def scenario(self) -> list[Op]:
        ch = self.ch
        kinds = ["user_writes_table", "flood", "quadrant", "mode_cache", "remote", "wp0", "large", "self_map",
                 "inherit", "oos"]
        if self.long:
            kinds.append("pkeys")
        kind = ch.choice(kinds)
        va, v = self.va(), self.vcpu()
        if kind == "pkeys":
            # a user page with protection key k, PKRU denying access or writes to k
            key = ch.choice((1, 2, 15))
            deny = ch.choice((1, 2, 3)) << (2 * key)
            return [Op("pke", (True,), v), Op("pkru", (deny,), v), Op("wp", (ch.chance(0.7),), v),
                    self.mapping(va, 1, (ch.choice(DATA) << 12) | P | W | U | A | D | (key << PKEY_SHIFT), v),
                    Op("invlpg", (va,), v),
                    self.access(va=va, vcpu=v, cpl=ch.choice((0, 3)), kind="read"),
                    self.access(va=va, vcpu=v, cpl=ch.choice((0, 3)), kind="store"),
                    Op("pkru", (0,), v), self.access(va=va, vcpu=v, cpl=3, kind="store")]
        if kind == "inherit":
            # an upper entry with fewer rights (U or W or X taken away) above a table
            # that is then shadowed and given a full-rights pte: the leaf must inherit
            # the upper level's limits (the seed's update_pte bug, the 2021 CVE)
            level = ch.choice(range(2, self.levels + (0 if self.mode is PagingMode.PAE else 1)))
            table = ch.choice(POOL)
            upper = P | A | (W if ch.chance(0.5) else 0) | (U if ch.chance(0.4) else 0)
            if self.wide and ch.chance(0.3):
                upper |= NX
            return [self.mapping(va, level, (table << 12) | upper, v), *self.maybe_invalidate(va, v),
                    self.access(va=va, vcpu=v, cpl=0, kind="read"),
                    self.mapping(va, 1, (ch.choice(DATA) << 12) | P | W | U | A | D, v),
                    self.access(va=va, vcpu=v, cpl=3, kind=ch.choice(("store", "read", "fetch")))]
        if kind == "oos":
            # out-of-sync shadows: both vCPUs hold a leaf translation, the guest rewrites the pte
            # twice (under +unsync the first write lets the table go out of sync, the second
            # lands without an exit), then invalidates in one of its ways, or not at all: a vCPU
            # that invalidated must see the new pte, one that did not may see either
            other = 1 - v
            table = ch.choice(POOL)
            link = (table << 12) | P | W | U | A
            ops = [self.mapping(va, 2, link, v),
                   self.mapping(va, 1, (ch.choice(DATA) << 12) | P | W | U | A | D, v), Op("invlpg", (va,), v),
                   self.access(va=va, vcpu=v, kind="read"), self.access(va=va, vcpu=other, kind="read"),
                   self.mapping(va, 1, (ch.choice(DATA) << 12) | P | W | U | A | D, v),
                   self.mapping(va, 1, self.junk((ch.choice(DATA) << 12) | self.flags()), v)]
            ops += ch.choice(([Op("invlpg", (va,), v)], [Op("flush", (), v)], [Op("shootdown", ("invlpg", va))],
                              [Op("pge", (True,), v), Op("pge", (False,), v)], []))
            ops += [self.access(va=va, vcpu=v), self.access(va=va, vcpu=other),
                    self.access(va=va, vcpu=v, kind="store")]
            if ch.chance(0.5):
                # the same (maybe out-of-sync) table linked under a second directory entry: nothing
                # was ever cached through that path, so it must show the pte as it is now
                va2 = va ^ (1 << (22 if self.mode is PagingMode.BITS32 else 21))
                ops += [self.mapping(va2, 2, link, v), self.access(va=va2, vcpu=v)]
            return ops
        if kind == "user_writes_table":
            # map a page table frame user-writable, shadow it, then user code stores to it
            table = ch.choice(POOL + ROOTS)
            return [self.mapping(va, 1, (table << 12) | P | W | U | A | D, v),
                    *self.maybe_invalidate(va, v),
                    self.access(kind="read", cpl=ch.choice((0, 3)), vcpu=v),
                    self.access(va=va, kind="store", cpl=3, vcpu=v)]
        if kind == "flood":
            # fork-like: several entries of one table in a row (the flood detector),
            # sometimes broken by a guest fault (its reset)
            table, idx = self.random_entry()
            ops = [self.access(vcpu=v)]
            for k in range(ch.choice((2, 3, 4, 5))):
                i = (idx + k) % (1024 if not self.wide else 512)
                if _protected(self.mode, table, i):
                    continue
                ops.append(self.entry_write(table, i, self.junk((ch.choice(DATA) << 12) | self.flags()), v))
                if ch.chance(0.15):
                    ops.append(self.access(vcpu=v))
            return ops + self.maybe_invalidate(va, v)
        if kind == "quadrant":
            # two entries 512 apart (the two halves of a 32-bit table, or any two entries)
            table, idx = self.random_entry()
            other = idx ^ 512 if not self.wide else idx ^ 256
            ops = [self.access(va=va, vcpu=v)]
            if not _protected(self.mode, table, other):
                ops.append(self.entry_write(table, other, (ch.choice(DATA) << 12) | self.flags(), v))
            return ops + [self.access(va=va, vcpu=v)]
        if kind == "mode_cache":
            # shadow pages built under one mode, a mode change, a pte write into the
            # (still cached) old pages, the mode changed back, the address used again
            mop = self.mode_op()
            back = Op(mop.kind, tuple(not a if isinstance(a, bool) else a for a in mop.args), mop.vcpu)
            return [self.access(va=va, vcpu=mop.vcpu), mop,
                    self.mapping(va, 1, self.junk((ch.choice(DATA) << 12) | self.flags()), mop.vcpu),
                    self.access(va=va, vcpu=mop.vcpu), back, self.access(va=va, vcpu=mop.vcpu)]
        if kind == "remote":
            # one vCPU holds a translation, the other changes the pte, with or without a shootdown
            other = 1 - v
            ops = [self.access(va=va, vcpu=other, kind="read"),
                   self.mapping(va, 1, self.junk((ch.choice(DATA) << 12) | self.flags()), v)]
            if ch.chance(0.5):
                ops.append(Op("shootdown", ("invlpg", va)))
            return ops + [self.access(va=va, vcpu=other)]
        if kind == "wp0":
            # CR0.WP=0 supervisor writes to read-only pages, with SMEP/SMAP and EFLAGS.AC
            return [Op("smep_smap", (ch.chance(0.6), ch.chance(0.6)), v), Op("wp", (False,), v),
                    self.mapping(va, 1, (ch.choice(DATA) << 12) | P | U * ch.chance(0.7) | A | D * ch.chance(0.5), v),
                    *self.maybe_invalidate(va, v),
                    Op("ac", (ch.chance(0.4),), v),
                    self.access(va=va, kind="store", cpl=0, vcpu=v),
                    self.access(va=va, cpl=ch.choice((0, 3)), vcpu=v),
                    self.access(va=va, kind="fetch", cpl=0, vcpu=v)]
        if kind == "large":
            level = ch.choice((2, 3) if self.long else (2,))
            frame = ch.choice(LARGE_FRAMES)
            ops = [self.mapping(va, level, self.junk((frame << 12) | self.flags() | PS), v),
                   *self.maybe_invalidate(va, v),
                   self.access(va=va, vcpu=v), self.access(va=va | 0x5000, vcpu=v, kind="store")]
            if ch.chance(0.4):
                # global large pages across a CR3 load: a TLB keeps them (flush_nonglobal)
                ops += [Op("pge", (True,), v), self.access(va=va, vcpu=v), Op("cr3", (ch.choice(ROOTS),), v),
                        self.access(va=va, vcpu=v)]
            return ops
        # self_map: a table entry pointing at its own table (or the root), then accesses through it
        table, idx = self.random_entry()
        to = ch.choice((table, ROOTS[0]))
        return [self.entry_write(table, idx, (to << 12) | self.flags(leaf=False), v),
                *self.maybe_invalidate(va, v), self.access(vcpu=v), self.access(vcpu=v, kind="store")]


def generate_program(ch: Chooser, mode: PagingMode, steps: int) -> list[Op]:
    gen = Generator(ch, mode)
    program: list[Op] = []
    while len(program) < steps:
        program.extend(gen.generate())
    return program[:steps]


# ------------------------------------------------------------------ running
class Device:
    """An MMIO register page: reads return a value derived from the address and
    how many reads came before (so a missed or repeated access shows), writes are
    logged.  Both sides must see exactly the same sequence."""

    def __init__(self):
        self.log: list[tuple] = []

    def read(self, gpa: int, size: int) -> int:
        self.log.append(("r", gpa, size))
        return ((gpa * 0x9E3779B1) ^ len(self.log)) & ((1 << (8 * size)) - 1)

    def write(self, gpa: int, size: int, value: int) -> None:
        self.log.append(("w", gpa, size, value))


def _guest_walk_to(v, mode: PagingMode, va: int, level: int):
    """The guest kernel's software walk (as Linux's pgd/pud/pmd_offset): read the
    entries down to ``level`` through the kernel window; the address of the entry
    at ``level`` or None when the path is missing, large, or outside the window."""
    wide = mode is not PagingMode.BITS32
    esz = 8 if wide else 4
    shifts = _SHIFTS[mode]
    nlevels = len(shifts)
    if level > nlevels - (1 if mode is PagingMode.PAE else 0) or level < 1:
        return None
    idx_mask = 0x3FF if not wide else 0x1FF
    if mode is PagingMode.PAE:
        table_addr = v.guest.cr3 & 0xFFFFFFE0
        top_idx_mask = 3
    else:
        table_addr = v.guest.cr3 & 0xFFFFF000 if not wide else v.guest.cr3 & 0x000FFFFFFFFFF000
        top_idx_mask = idx_mask
    for depth, shift in enumerate(shifts):
        lvl = nlevels - depth
        idx = (va >> shift) & (top_idx_mask if depth == 0 else idx_mask)
        addr = table_addr + idx * esz
        if addr >> 12 >= WINDOW_PAGES:
            return None
        if lvl == level:
            return addr
        e = v.load(addr, esz)
        if not e & P or e & PS:
            return None
        table_addr = e & (0x000FFFFFFFFFF000 if wide else 0xFFFFF000)
    return None


# ops that set or clear one control-register bit: op kind -> (register, bit)
_TOGGLES = {"wp": ("cr0", CR0_WP), "nxe": ("efer", EFER_NXE), "pge": ("cr4", CR4_PGE),
            "pke": ("cr4", CR4_PKE), "pse": ("cr4", CR4_PSE)}


def execute(vm: VM, op: Op, mode: PagingMode):
    """Run one op on vCPU ``op.vcpu``; return what the guest observes."""
    v = vm.vcpus[op.vcpu]
    kind, args = op.kind, op.args
    try:
        if kind in ("read", "fetch", "store"):
            va, cpl = args[0], args[1]
            v.set_cpl(cpl)
            try:
                if kind == "read":
                    return ("value", v.load(va, args[2]))
                if kind == "fetch":
                    return ("value", v.fetch(va))
                v.store(va, args[3], args[2])
            finally:
                v.set_cpl(0)
            return "ok"
        if kind == "write_entry":
            addr, value, size = args
            v.set_cpl(0)
            v.store(addr, value, size)
            return "ok"
        if kind == "map":
            va, level, value = args
            v.set_cpl(0)
            addr = _guest_walk_to(v, mode, va, level)
            if addr is None:
                return "no path"
            v.store(addr, value, 8 if mode is not PagingMode.BITS32 else 4)
            return ("mapped", addr)
        if kind == "invlpg":
            v.invlpg(args[0])
            return "ok"
        if kind == "flush":
            v.invalidate_all()
            return "ok"
        if kind == "shootdown":
            # an IPI to every vCPU: each invalidates its own TLB
            for w in vm.vcpus:
                if args[0] == "invlpg":
                    w.invlpg(args[1])
                else:
                    w.invalidate_all()
            return "ok"
        if kind == "cr3":
            v.write_cr3(args[0] << 12)
            return "ok"
        if kind in _TOGGLES:
            reg, bit = _TOGGLES[kind]
            old = getattr(v.guest, reg)
            getattr(v, f"write_{reg}")(old | bit if args[0] else old & ~bit)
            return "ok"
        if kind == "ac":
            v.set_ac(args[0])
            return "ok"
        if kind == "smep_smap":
            cr4 = v.guest.cr4 & ~(CR4_SMEP | CR4_SMAP)
            v.write_cr4(cr4 | (CR4_SMEP if args[0] else 0) | (CR4_SMAP if args[1] else 0))
            return "ok"
        if kind == "pkru":
            v.write_pkru(args[0])
            return "ok"
        if kind == "bad_cr":
            # writes a guest may attempt and the CPU must refuse with #GP (or accept,
            # where the mode allows it): both sides must answer alike
            g = v.guest
            what = args[0]
            if what == "lme":
                v.write_efer(g.efer ^ (1 << 8))
            elif what == "la57":
                v.write_cr4(g.cr4 ^ (1 << 12))
            elif what == "pg_no_pe":
                v.write_cr0(g.cr0 & ~1)
            elif what == "cr3_high":
                v.write_cr3(g.cr3 | (1 << 45))
            else:
                v.write_cr4(g.cr4 & ~(1 << 5))
            return "ok"
        if kind == "paging_off":
            # paging off, one access to a physical address, paging back on
            what, pa = args
            cr0 = v.guest.cr0
            v.write_cr0(cr0 & ~CR0_PG)
            try:
                if what == "read":
                    out = ("value", v.load(pa, 8))
                else:
                    v.store(pa, 0x5A5A5A5A5A5A5A5A, 8)
                    out = "ok"
            finally:
                v.write_cr0(cr0)
            return out
        if kind == "dirty_log":
            # the hypervisor's side of live migration: invisible to the guest, so the
            # outcome is "ok" on both sides; the frames read go to vm.dirty_read
            vm.dirty_read = None
            if vm.mmu is not None:
                slot = vm.slots[0]
                if args[0] == "on" and slot.dirty_bitmap is None:
                    vm.mmu.enable_dirty_log(slot)
                elif args[0] == "off" and slot.dirty_bitmap is not None:
                    vm.mmu.disable_dirty_log(slot)
                elif args[0] == "get" and slot.dirty_bitmap is not None:
                    vm.dirty_read = frozenset(vm.mmu.get_dirty_log(slot))
            return "ok"
    except PageFault as pf:
        return ("#PF", pf.address, pf.error_code)
    except GeneralProtection as gp:
        return ("#GP", str(gp))
    raise ValueError(f"unknown op {kind!r}")


@dataclass
class Divergence:
    step: int
    op: Op
    what: str
    native: object
    shadow: object
    program: list = field(default_factory=list)
    pool_pages: int = 64         # the shadow pool the program ran with (the shrinker keeps it)

    def __str__(self) -> str:
        lines = [f"divergence at step {self.step}: {self.op}: {self.what}",
                 f"  native: {self.native}", f"  shadow: {self.shadow}", "program:"]
        lines += [f"  {i:4d} {op}" for i, op in enumerate(self.program[:self.step + 1])]
        return "\n".join(lines)


def _memory_diff(a: dict, b: dict) -> str | None:
    for gfn in sorted(set(a) | set(b)):
        x, y = a.get(gfn, bytes(4096)), b.get(gfn, bytes(4096))
        if x != y:
            off = next(i for i in range(4096) if x[i] != y[i])
            off &= ~7
            return (f"guest memory differs at gpa {(gfn << 12) + off:#x}: native "
                    f"{int.from_bytes(x[off:off + 8], 'little'):#018x}, shadow {int.from_bytes(y[off:off + 8], 'little'):#018x}")
    return None


def _guarded(vm: VM, op: Op, mode: PagingMode):
    """execute(), with an internal error of the model reported as an outcome (so a
    crash of one side is a divergence with a program, not a lost traceback)."""
    try:
        return execute(vm, op, mode)
    except Exception as e:          # noqa: BLE001 - any model error is a finding
        return ("crash", f"{type(e).__name__}: {e}")


class LatitudeTlb(Tlb):
    """A native vCPU's TLB that also remembers, per 4 KB page, the translations the
    vCPU could hold: every one valid since its last invalidation of that page.
    ``could``: vpn -> set of TLB entries (as ``Tlb.fill`` makes them)."""

    def __init__(self):
        super().__init__()
        self.could: dict[int, set[tuple]] = {}

    def invlpg(self, vaddr: int) -> None:
        super().invlpg(vaddr)
        self.could.pop(vaddr >> 12, None)

    def translate(self, mem, cpu, vaddr: int, access: int = 0, probe: bool = False) -> int:
        """A page fault invalidates the TLB entries of its page (SDM 4.10.4.1), the
        ones the vCPU could hold too."""
        try:
            return super().translate(mem, cpu, vaddr, access, probe)
        except PageFault:
            self.could.pop(vaddr >> 12, None)
            raise

    def flush(self) -> None:
        super().flush()
        self.could.clear()

    def flush_nonglobal(self) -> None:
        super().flush_nonglobal()
        kept = {vpn: {e for e in s if e[3]} for vpn, s in self.could.items()}
        self.could = {vpn: s for vpn, s in kept.items() if s}

    def drop_cached(self) -> None:
        """The checker's own flush (to re-run a step with fresh walks): not the guest's
        invalidation, so the translations it could hold stay."""
        Tlb.flush(self)

    def remember(self, gmem, cpu, vas) -> None:
        """Add the current 4 KB translation of each of ``vas`` (a leaf with A set: a
        walk that cached it would have set A) to what this vCPU could hold."""
        for va in vas:
            t = translate(gmem, cpu, va, 0, set_ad=False, probe=True)
            if t is not None and t.entries and t.page_shift == 12 and t.entries[-1][2] & PTE_A:
                self.could.setdefault(va >> 12, set()).add(
                    (t.paddr & ~0xFFF, t.rights, t.dirty, t.global_page, t.pkey))


# ops that may change a translation (they store to guest memory)
_WRITING_OPS = frozenset(("store", "write_entry", "map", "paging_off"))


class _NativeCheckpoint:
    """Native guest memory, one vCPU's TLB and the device log, to re-run a step
    with fresh walks (the TLB-latitude retry)."""

    def __init__(self, vm: VM, vcpu):
        host = vm.host
        self.frames = {pfn: bytes(f[0]) for pfn, f in host.frames.items()}
        tlb = vcpu.tlb
        self.small = dict(tlb.small)
        self.large = {s: {k: set(v) for k, v in d.items()} for s, d in tlb.large.items()}
        self.nr_large = tlb.nr_large
        self.could = {vpn: set(c) for vpn, c in tlb.could.items()}
        self.cr2 = vcpu.cr2
        self.log_len = len(vm.device.log)

    def restore(self, vm: VM, vcpu) -> None:
        zero = bytes(4096)
        for pfn, f in vm.host.frames.items():
            f[0][:] = self.frames.get(pfn, zero)
        tlb = vcpu.tlb
        tlb.small = self.small
        tlb.large = self.large
        tlb.nr_large = self.nr_large
        tlb.could = {vpn: set(c) for vpn, c in self.could.items()}
        vcpu.cr2 = self.cr2
        del vm.device.log[self.log_len:]


_MEMORY_OPS = frozenset(("read", "fetch", "store", "write_entry", "map"))


class Lockstep:
    """A native VM and a shadow VM running the same ops."""

    def __init__(self, mode: PagingMode, policy: str, *, seed_bug: bool = False, pool_pages: int = 64,
                 audit: bool = True, nr_vcpus: int = NR_VCPUS):
        self.mode = mode
        self.native = VM(RAM_SIZE, native=True, nr_vcpus=nr_vcpus)
        # audit=False: the checker audits after every step itself
        self.shadow = VM(RAM_SIZE, pte_write=policy, seed_access_bug=seed_bug, pool_pages=pool_pages,
                         nr_vcpus=nr_vcpus, audit=False)
        for v in self.native.vcpus:
            v.tlb = LatitudeTlb()
        # out-of-sync shadows use the speculative-caching latitude (see the module's text)
        self.speculative = parse_policy(policy).unsync
        self.latitude_vas = tuple(compose_va(mode, idx) for idx in product(*_INDICES[mode]))
        self.speculative_ok = 0      # steps accepted only with a translation the vCPU could hold
        for vm in (self.native, self.shadow):
            vm.device = Device()
            vm.dirty_read = None
            vm.add_mmio(MMIO_GFN << 12, 4096, vm.device, "regs")
            build_world(vm, mode)
        self.audit = audit
        self.steps = 0
        self.stale_ok = 0            # steps where the guest saw the old translation on native only
        self.dirty_base: dict[int, bytes] | None = None    # native memory when the dirty log was last read
        # tdp: the count of the MMU's INVEPTs, mirrored on native's TLBs (see step())
        self.tdp_flushes = self.shadow.mmu.stats["tlb_flushes"] if getattr(self.shadow.mmu, "tdp", False) else None

    def _compare(self, a, b, shadow_mem: dict) -> tuple[str, object, object] | None:
        """What the guest could tell apart after one step, or None."""
        if a != b:
            return "different outcome", a, b
        if self.native.device.log != self.shadow.device.log:
            return "the device saw different MMIO accesses", self.native.device.log[-3:], self.shadow.device.log[-3:]
        diff = _memory_diff(self.native.gmem.snapshot(), shadow_mem)
        return (diff, "", "") if diff else None

    def step(self, i: int, op: Op, program) -> Divergence | None:
        if op.vcpu >= len(self.native.vcpus):
            raise ValueError(f"op {op} names vCPU {op.vcpu}; the VMs have {len(self.native.vcpus)}")
        nv = self.native.vcpus[op.vcpu]
        if self.speculative and op.kind in _WRITING_OPS:
            for v in self.native.vcpus:
                v.tlb.remember(self.native.gmem, probe_cpu(v.guest), self.latitude_vas)
        ckpt = (_NativeCheckpoint(self.native, nv) if op.kind in _MEMORY_OPS and (nv.tlb.small or nv.tlb.could)
                else None)
        a = _guarded(self.native, op, self.mode)
        b = _guarded(self.shadow, op, self.mode)
        self.steps += 1
        shadow_mem = self.shadow.gmem.snapshot()
        bad = self._compare(a, b, shadow_mem)
        if bad and ckpt is not None:
            # TLB latitude: native may have used a translation the guest changed without
            # invalidating; the new one is always allowed, so re-run native with fresh walks
            first = bad
            ckpt.restore(self.native, nv)
            nv.tlb.drop_cached()
            bad = self._compare(_guarded(self.native, op, self.mode), b, shadow_mem)
            if bad is None:
                self.stale_ok += 1
                if self.tdp_flushes is not None:
                    # tdp's TLB is native's twin; native's was just emptied to re-run the
                    # step, so tdp's goes too (else it would hold older entries than native's)
                    self.shadow.vcpus[op.vcpu].tlb.flush()
            elif self.speculative and self._speculative_match(op, nv, ckpt, b, shadow_mem):
                self.speculative_ok += 1
                bad = None
            else:
                bad = first
        if bad:
            return Divergence(i, op, bad[0], bad[1], bad[2], program)
        if self.tdp_flushes is not None and self.shadow.mmu.stats["tlb_flushes"] != self.tdp_flushes:
            # Under tdp the combined TLB caches exactly what native's does, except that the
            # hypervisor's INVEPTs (dirty log, EPT zaps) empty it.  Native drops the same
            # entries at the same step (a TLB may drop any entry at any time): otherwise tdp's
            # TLB, refilled since, mixes translations of different ages that neither of the
            # two candidates above reproduces, though both machines are right.
            self.tdp_flushes = self.shadow.mmu.stats["tlb_flushes"]
            for w in self.native.vcpus:
                w.tlb.drop_cached()
        native_mem = self.native.gmem.snapshot()
        if op.kind == "dirty_log":
            d = self._check_dirty_log(op, self.shadow.dirty_read, native_mem)
            if d:
                return Divergence(i, op, d, "", "", program)
        if self.audit:
            try:
                self.shadow.audit()
            except AuditError as e:
                return Divergence(i, op, f"audit: {e}", "", "", program)
        return None

    def _speculative_match(self, op: Op, nv, ckpt, b, shadow_mem: dict) -> bool:
        """Re-run native with each combination of translations the vCPU could hold for
        the page(s) the access touches cached; True if one gives the shadow's outcome
        (native's state is then that run's)."""
        if op.kind not in ("read", "fetch", "store"):
            return False
        va, size = op.args[0], 1 if op.kind == "fetch" else op.args[2]
        pages = sorted({va >> 12, (va + size - 1) >> 12})
        choices = [[None, *ckpt.could.get(vpn, ())] for vpn in pages]
        for combo in product(*choices):
            if not any(combo):
                continue                            # that one is the fresh-walk run, already tried
            ckpt.restore(self.native, nv)
            nv.tlb.drop_cached()
            for vpn, entry in zip(pages, combo):
                if entry is not None:
                    nv.tlb.small[vpn] = entry
            if self._compare(_guarded(self.native, op, self.mode), b, shadow_mem) is None:
                return True
        return False

    def _check_dirty_log(self, op: Op, logged, native_mem: dict) -> str | None:
        """Every guest frame whose bytes changed since logging began or the log was
        last read (on the native side: the truth) must be in the log; extra frames
        are allowed (KVM may log a frame it only made writable)."""
        if op.args[0] == "off":
            self.dirty_base = None
            return None
        if op.args[0] == "on" and self.dirty_base is None:
            self.dirty_base = native_mem
            return None
        if logged is None or self.dirty_base is None:
            return None
        base, self.dirty_base = self.dirty_base, native_mem
        changed = {gfn for gfn in set(base) | set(native_mem) if base.get(gfn) != native_mem.get(gfn)}
        missed = changed - logged
        if missed:
            return f"dirty log misses written frames {sorted(map(hex, missed))}"
        return None

    def run(self, program: list[Op]) -> Divergence | None:
        for i, op in enumerate(program):
            d = self.step(i, op, program)
            if d is not None:
                return d
        return None


def run_program(program: list[Op], mode: PagingMode, policy: str, *, seed_bug: bool = False,
                pool_pages: int = 64, audit: bool = True) -> Divergence | None:
    return Lockstep(mode, policy, seed_bug=seed_bug, pool_pages=pool_pages, audit=audit).run(program)


def campaign(mode: PagingMode, policy: str, *, steps: int, seed: int = 0, program_len: int = 200,
             seed_bug: bool = False, pool_pages: int = 64, progress=None) -> tuple[Divergence | None, int]:
    """Run random programs until ``steps`` steps are done or a divergence appears.
    Returns (divergence or None, steps run).  Every fourth program runs with a
    16-page shadow pool, so reclaim happens under pressure."""
    done = 0
    n = 0
    while done < steps:
        ch = RandomChooser(seed * 1_000_003 + n)
        pool = 16 if n % 4 == 3 else pool_pages
        n += 1
        length = min(program_len, steps - done)
        program = generate_program(ch, mode, length)
        d = run_program(program, mode, policy, seed_bug=seed_bug, pool_pages=pool)
        if d is not None:
            d.pool_pages = pool
            return d, done + d.step + 1
        done += length
        if progress is not None:
            progress(length)
    return None, done


def shrink(d: Divergence, mode: PagingMode, policy: str, *, seed_bug: bool = False) -> Divergence:
    """Greedily drop ops while the program still diverges: a short story to read.
    Chunks first (halves, quarters, ...), then single ops, so a 200-step program
    shrinks in a few hundred runs of short programs."""
    pool = d.pool_pages

    def fails(prog):
        return run_program(prog, mode, policy, seed_bug=seed_bug, pool_pages=pool)

    program = d.program[:d.step + 1]
    chunk = max(1, len(program) // 2)
    while True:
        i = 0
        while i < len(program):
            candidate = program[:i] + program[i + chunk:]
            dd = fails(candidate) if candidate else None
            if dd is not None:
                program = candidate[:dd.step + 1]
            else:
                i += chunk
        if chunk == 1:
            break
        chunk //= 2
    out = fails(program) or d
    out.pool_pages = pool
    return out
