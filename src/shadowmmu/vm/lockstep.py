"""Lockstep: one guest program on a native VM and on a shadow VM, compared.

The shadow MMU is correct when the guest cannot tell it is there: every value
read, every fault delivered (address and error code), every #GP, and every byte
of guest memory, A and D bits included, must be the same as on native paging.
``audit()`` runs after every step on the shadow side.

Programs are data: a list of ops over a small world (two address spaces, a pool
of page-table frames and data frames, an identity-mapped kernel window through
which CPL0 stores edit the tables).  The generator draws from a ``Chooser``, so
the same generator serves a seeded campaign (``RandomChooser``) and hypothesis
(which then shrinks a failing program to a short one).

The guest follows the TLB rules Linux follows: after editing a paging entry it
flushes the TLB (otherwise native may legitimately use a stale translation that
the shadow has already dropped, which is latitude, not a bug).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..mmu.audit import AuditError
from ..x86.bits import CR0_WP, CR4_SMAP, CR4_SMEP, EFER_NXE
from ..x86.builder import control_registers
from ..x86.faults import GeneralProtection, PageFault
from ..x86.formats import PagingMode
from .vm import VM

RAM_SIZE = 16 << 20
WINDOW_PAGES = 0x80              # gva 0..512K identity-mapped for the kernel: tables and data live here
GUESTS = {"32": PagingMode.BITS32, "pae": PagingMode.PAE, "64": PagingMode.LEVEL4, "la57": PagingMode.LEVEL5}

# frames (gfns) of the world
ROOTS = (0x10, 0x11)             # two address spaces (PAE: the PDPT pages)
WINDOW_TABLES = (0x12, 0x13, 0x14, 0x15)
POOL = tuple(range(0x20, 0x2C))  # page tables the program links and edits
DATA = tuple(range(0x30, 0x38))
LARGE_FRAMES = (0x200, 0x400, 0x201)   # 2M/4M-aligned targets (0x201: misaligned -> reserved bits)

# flag bits the generator combines
P, W, U, A, D, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63


class Chooser:
    """Where a program's random decisions come from."""

    def choice(self, options):
        raise NotImplementedError

    def chance(self, p: float) -> bool:
        raise NotImplementedError


class RandomChooser(Chooser):
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def choice(self, options):
        return options[self.rng.randrange(len(options))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


class HypothesisChooser(Chooser):
    """Decisions drawn from hypothesis's ``st.data()``, so failing programs shrink."""

    def __init__(self, data):
        from hypothesis import strategies as st
        self.data = data
        self.st = st

    def choice(self, options):
        return self.data.draw(self.st.sampled_from(list(options)))

    def chance(self, p: float) -> bool:
        return self.data.draw(self.st.integers(0, 99)) < p * 100


# ------------------------------------------------------------------ the world
def _test_indices(mode: PagingMode):
    """Per level, top first, the entry indices test addresses use."""
    if mode is PagingMode.BITS32:
        return ((256, 257), (0, 1, 2))
    if mode is PagingMode.PAE:
        return ((1, 2), (0, 1), (0, 1, 2))
    if mode is PagingMode.LEVEL5:
        return ((1, 2), (0, 1), (0, 1), (0, 1), (0, 1, 2))
    return ((1, 2), (0, 1), (0, 1), (0, 1, 2))


def test_addresses(mode: PagingMode) -> list[int]:
    idx = _test_indices(mode)
    shifts = (22, 12) if mode is PagingMode.BITS32 else tuple(12 + 9 * (len(idx) - 1 - i) for i in range(len(idx)))
    if mode is PagingMode.PAE:
        shifts = (30, 21, 12)
    out = [0]
    for choices, shift in zip(idx, shifts):
        out = [va | (c << shift) for va in out for c in choices]
    return out


def entry_indices(mode: PagingMode) -> tuple[int, ...]:
    return tuple(sorted({i for level in _test_indices(mode) for i in level}))


def build_world(vm: VM, mode: PagingMode) -> None:
    """Initial memory (a boot loader's work, before the guest runs), then paging on."""
    g = vm.gmem
    wide = mode is not PagingMode.BITS32
    esz = 8 if wide else 4
    put = g.write_u64 if wide else g.write_u32
    for root in ROOTS:
        if mode is PagingMode.BITS32:
            put((root << 12), (WINDOW_TABLES[0] << 12) | P | W | A)
        elif mode is PagingMode.PAE:
            put((root << 12), (WINDOW_TABLES[0] << 12) | P)
        else:
            put((root << 12), (WINDOW_TABLES[0] << 12) | P | W | A)
    # the window: gva == gpa for the first WINDOW_PAGES frames, supervisor, RW, A|D;
    # a chain of window tables below the root, one per remaining level
    chain = {PagingMode.BITS32: 1, PagingMode.PAE: 2, PagingMode.LEVEL4: 3, PagingMode.LEVEL5: 4}[mode]
    for upper, lower in zip(WINDOW_TABLES[:chain - 1], WINDOW_TABLES[1:chain]):
        put(upper << 12, (lower << 12) | P | W | A)
    pt = WINDOW_TABLES[chain - 1]
    for gfn in range(WINDOW_PAGES):
        put((pt << 12) + gfn * esz, (gfn << 12) | P | W | A | D)
    for i, gfn in enumerate(DATA):
        g.write_u64(gfn << 12, 0x1111111111111111 * (i + 1))
    # the test tree: every test address mapped, tables shared where paths meet
    for (table, idx), target in initial_tree(mode).items():
        flags = P if (mode is PagingMode.PAE and table in ROOTS) else P | W | U | A
        put((table << 12) + idx * esz, (target << 12) | flags)
    regs = control_registers(mode, ROOTS[0] << 12, wp=True, nxe=wide, pse=True)
    vm.vcpu.setup_paging(**regs)


def initial_tree(mode: PagingMode) -> dict[tuple[int, int], int]:
    """(table gfn, index) -> target gfn of the initial test mapping.  Tables are
    assigned from POOL level by level, and the second subtree of each level
    shares one table with the first (two upper entries, one lower table)."""
    levels = _test_indices(mode)
    tree: dict[tuple[int, int], int] = {}
    pool = list(POOL)
    tables = [ROOTS[0]]
    for depth, choices in enumerate(levels):
        last = depth == len(levels) - 1
        nxt = []
        for t_i, table in enumerate(tables):
            for c_i, idx in enumerate(choices):
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
            tree[(ROOTS[1], idx)] = target
    return tree


# ------------------------------------------------------------------ programs
@dataclass(frozen=True)
class Op:
    kind: str
    args: tuple = ()

    def __str__(self) -> str:
        def fmt(a):
            return hex(a) if isinstance(a, int) and not isinstance(a, bool) and a > 9 else str(a)
        return f"{self.kind}({', '.join(fmt(a) for a in self.args)})"


def generate_op(ch: Chooser, mode: PagingMode) -> Op:
    wide = mode is not PagingMode.BITS32
    vas = test_addresses(mode)
    r = ch.choice(range(100))
    if r < 35:                                   # edit a paging entry through the kernel window
        tree = initial_tree(mode)
        if ch.chance(0.7):                      # mostly: re-flag an entry of the tree
            table, idx = ch.choice(sorted(tree))
            target = tree[(table, idx)] if ch.chance(0.8) else ch.choice(POOL + DATA + ROOTS)
        else:
            table = ch.choice(ROOTS + POOL)
            idx = ch.choice(entry_indices(mode))
            target = ch.choice(POOL + DATA + ROOTS)
        flags = 0
        if ch.chance(0.1):
            target = ch.choice(LARGE_FRAMES)
            flags = PS
        flags |= P if ch.chance(0.9) else 0
        if mode is PagingMode.PAE and table in ROOTS:
            pass                                 # a PDPTE: W/U/A/D/NX are reserved there
        else:
            for bit, p in ((W, 0.7), (U, 0.7), (A, 0.8), (D, 0.6), (G, 0.1)):
                flags |= bit if ch.chance(p) else 0
            if wide and ch.chance(0.15):
                flags |= NX
        value = (target << 12) | flags
        if ch.chance(0.04):
            value |= ch.choice((1 << 45, 1 << 52, 1 << 13, 1 << 21) if wide else (1 << 21, 1 << 13))
        esz = 8 if wide else 4
        addr = (table << 12) + idx * esz
        size = esz
        if ch.chance(0.08):                     # partial and straddling writes
            size, delta = ch.choice(((4, 0), (4, 4), (2, 0), (8, 4), (1, 0)) if wide else ((2, 0), (8, 0), (4, 2)))
            addr += delta
        value &= (1 << (8 * size)) - 1
        return Op("write_entry", (addr, value, size))
    if r < 80:                                   # an access in the test region
        va = ch.choice(vas) | ch.choice((0, 8, 0xFF8, 0xFFC))
        cpl = ch.choice((0, 3))
        kind = ch.choice(("read", "read", "write", "fetch"))
        size = ch.choice((8, 4, 1))
        if kind == "write":
            return Op("store", (va, cpl, size, ch.choice(range(1, 256)) * 0x0101010101010101 & ((1 << 8 * size) - 1)))
        return Op(kind, (va, cpl, size))
    if r < 86:
        return Op("cr3", (ch.choice(ROOTS),))
    if r < 90:
        return Op("wp", (ch.chance(0.5),))
    if r < 93 and wide:
        return Op("nxe", (ch.chance(0.7),))
    if r < 96:
        return Op("ac", (ch.chance(0.5),))
    if r < 98:
        return Op("smep_smap", (ch.chance(0.5), ch.chance(0.5)))
    return Op("invlpg", (ch.choice(vas),))


def generate_program(ch: Chooser, mode: PagingMode, steps: int) -> list[Op]:
    return [generate_op(ch, mode) for _ in range(steps)]


# ------------------------------------------------------------------ running
def execute(vm: VM, op: Op):
    """Run one op; return what the guest observes."""
    v = vm.vcpu
    try:
        if op.kind == "write_entry":
            addr, value, size = op.args
            v.set_cpl(0)
            v.store(addr, value, size)
            v.invalidate_all()
            return "ok"
        if op.kind in ("read", "fetch", "store"):
            va, cpl = op.args[0], op.args[1]
            v.set_cpl(cpl)
            try:
                if op.kind == "read":
                    return ("value", v.load(va, op.args[2]))
                if op.kind == "fetch":
                    return ("value", v.fetch(va))
                v.store(va, op.args[3], op.args[2])
            finally:
                v.set_cpl(0)
            v.invalidate_all()            # the store may have hit a page table
            return "ok"
        if op.kind == "cr3":
            v.write_cr3(op.args[0] << 12)
            return "ok"
        if op.kind == "wp":
            v.write_cr0((v.guest.cr0 | CR0_WP) if op.args[0] else (v.guest.cr0 & ~CR0_WP))
            return "ok"
        if op.kind == "nxe":
            v.write_efer((v.guest.efer | EFER_NXE) if op.args[0] else (v.guest.efer & ~EFER_NXE))
            v.invalidate_all()       # the SDM does not say WRMSR(EFER) flushes the TLB; Linux would
            return "ok"
        if op.kind == "ac":
            v.set_ac(op.args[0])
            return "ok"
        if op.kind == "smep_smap":
            cr4 = v.guest.cr4 & ~(CR4_SMEP | CR4_SMAP)
            v.write_cr4(cr4 | (CR4_SMEP if op.args[0] else 0) | (CR4_SMAP if op.args[1] else 0))
            return "ok"
        if op.kind == "invlpg":
            v.invlpg(op.args[0])
            return "ok"
    except PageFault as pf:
        return ("#PF", pf.address, pf.error_code)
    except GeneralProtection as gp:
        return ("#GP", str(gp))
    raise ValueError(f"unknown op {op.kind!r}")


@dataclass
class Divergence:
    step: int
    op: Op
    what: str
    native: object
    shadow: object
    program: list = field(default_factory=list)

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


def _guarded(vm: VM, op: Op):
    """execute(), with an internal error of the model reported as an outcome (so a
    crash of one side is a divergence with a program, not a lost traceback)."""
    try:
        return execute(vm, op)
    except Exception as e:          # noqa: BLE001 - any model error is a finding
        return ("crash", f"{type(e).__name__}: {e}")


class Lockstep:
    """A native VM and a shadow VM running the same ops."""

    def __init__(self, mode: PagingMode, policy: str, *, seed_bug: bool = False, pool_pages: int = 64,
                 audit: bool = True):
        self.mode = mode
        self.native = VM(RAM_SIZE, native=True)
        self.shadow = VM(RAM_SIZE, pte_write=policy, seed_access_bug=seed_bug, pool_pages=pool_pages)
        self.audit = audit
        build_world(self.native, mode)
        build_world(self.shadow, mode)
        self.steps = 0

    def step(self, i: int, op: Op, program) -> Divergence | None:
        a = _guarded(self.native, op)
        b = _guarded(self.shadow, op)
        self.steps += 1
        if a != b:
            return Divergence(i, op, "different outcome", a, b, program)
        diff = _memory_diff(self.native.guest_memory(), self.shadow.guest_memory())
        if diff:
            return Divergence(i, op, diff, "", "", program)
        if self.audit:
            try:
                self.shadow.audit()
            except AuditError as e:
                return Divergence(i, op, f"audit: {e}", "", "", program)
        return None

    def run(self, program: list[Op]) -> Divergence | None:
        for i, op in enumerate(program):
            d = self.step(i, op, program)
            if d is not None:
                return d
        return None


def run_program(program: list[Op], mode: PagingMode, policy: str, *, seed_bug: bool = False,
                pool_pages: int = 64) -> Divergence | None:
    return Lockstep(mode, policy, seed_bug=seed_bug, pool_pages=pool_pages).run(program)


def campaign(mode: PagingMode, policy: str, *, steps: int, seed: int = 0, program_len: int = 200,
             seed_bug: bool = False, progress=None) -> tuple[Divergence | None, int]:
    """Run random programs until ``steps`` steps are done or a divergence appears.
    Returns (divergence or None, steps run)."""
    done = 0
    n = 0
    while done < steps:
        ch = RandomChooser(seed * 1_000_003 + n)
        n += 1
        length = min(program_len, steps - done)
        program = generate_program(ch, mode, length)
        d = run_program(program, mode, policy, seed_bug=seed_bug)
        if d is not None:
            return d, done + d.step + 1
        done += length
        if progress is not None:
            progress(length)
    return None, done


def shrink(d: Divergence, mode: PagingMode, policy: str, *, seed_bug: bool = False) -> Divergence:
    """Greedily drop ops while the program still diverges: a short story to read."""
    program = d.program[:d.step + 1]
    i = 0
    while i < len(program):
        candidate = program[:i] + program[i + 1:]
        dd = run_program(candidate, mode, policy, seed_bug=seed_bug)
        if dd is not None:
            program = candidate[:dd.step + 1]
        else:
            i += 1
    return run_program(program, mode, policy, seed_bug=seed_bug) or d
