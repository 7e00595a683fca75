"""Test-side x86 paging: a page-table builder for one test address, and the paging
rules of the Intel SDM (vol. 3A ch. 4) written out plainly, independent of the model.

Nothing here calls the model's permission table, reserved masks or bit constants:
bit positions are spelled out again from the SDM so that a wrong constant in
``shadowmmu.x86.bits`` cannot hide behind a test that shares it.  The model is
used only as the thing under test (``CpuState``, ``PhysicalMemory``, ``translate``)
and for the ACC_* flags its API takes.

The fixed layout, per paging mode (``MODES``):

    level 5 PML5E, 4 PML4E, 3 PDPTE, 2 PDE, 1 PTE   (32-bit paging: levels 2 and 1;
                                                      PAE: level 3 is a PDPTE register)
    the table of level L lives at TABLE_BASE + L * 4 KiB; CR3 points at the top one;
    the test address uses index INDEX[L] at every level and offset OFFSET;
    a 4 KB leaf maps LEAF_FRAME[12], a 2 MB / 4 MB leaf LEAF_FRAME[21 / 22],
    a 1 GB leaf LEAF_FRAME[30].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from shadowmmu.x86 import CpuState, PageFault, PhysicalMemory, Tlb, translate
from shadowmmu.x86.bits import ACC_FETCH, ACC_IMPLICIT, ACC_USER, ACC_WRITE

# ---------------------------------------------------------------------------
# Bit positions, from the SDM (tables 4-4 .. 4-20, section 4.7, 2.5, 2.2.1)


def bit(n: int) -> int:
    return 1 << n


def bits(lo: int, hi: int) -> int:
    """Bits lo..hi inclusive; 0 when hi < lo."""
    return ((1 << (hi - lo + 1)) - 1) << lo if hi >= lo else 0


# paging-structure entries
P, W, U, PWT, PCD, A, D, PS, G = (bit(i) for i in range(9))
PAT_4K = bit(7)                 # bit 7 of a 4 KB pte is PAT, not PS
PAT_LARGE = bit(12)             # bit 12 of a 2 MB / 4 MB / 1 GB leaf is PAT
NX = bit(63)                    # XD, 8-byte formats only
PKEY_SHIFT = 59                 # bits 62:59 of an IA-32e leaf: protection key

# page-fault error code (SDM 4.7)
EC_P, EC_W, EC_U, EC_RSVD, EC_ID, EC_PK = (bit(i) for i in range(6))

# control registers
CR0_PE, CR0_WP, CR0_PG = bit(0), bit(16), bit(31)
CR4_PSE, CR4_PAE, CR4_PGE, CR4_LA57 = bit(4), bit(5), bit(7), bit(12)
CR4_SMEP, CR4_SMAP, CR4_PKE = bit(20), bit(21), bit(22)
EFER_LME, EFER_NXE = bit(8), bit(11)

# ---------------------------------------------------------------------------
# Paging modes and the fixed test layout

BITS32, PAE, LEVEL4, LEVEL5 = "32-bit", "pae", "4-level", "5-level"
MODES = (BITS32, PAE, LEVEL4, LEVEL5)
MODE_LEVELS = {BITS32: (2, 1), PAE: (3, 2, 1), LEVEL4: (4, 3, 2, 1), LEVEL5: (5, 4, 3, 2, 1)}
LEVEL_NAMES = {5: "pml5e", 4: "pml4e", 3: "pdpte", 2: "pde", 1: "pte"}

TABLE_BASE = 0x0010_0000
INDEX = {5: 0x0A1, 4: 0x0B2, 3: 0x0C3, 2: 0x0D4, 1: 0x0E5}     # 9-bit indexes (bit 8 clear: low half)
INDEX_PAE_PDPT = 2
INDEX_32 = {2: 0x2D4, 1: 0x2E5}                                 # 10-bit indexes
OFFSET = 0x678
LEAF_FRAME = {12: 0x0ABC_D000, 21: 0x0C00_0000, 22: 0x0C00_0000, 30: 0x8000_0000}
MEMORY_SIZE = 1 << 32


def is_wide(mode: str) -> bool:
    """8-byte entries (PAE and IA-32e) rather than 4-byte ones (32-bit paging)."""
    return mode != BITS32


def level_shift(mode: str, level: int) -> int:
    """log2 of the region one entry of ``level`` maps."""
    if mode == BITS32:
        return 22 if level == 2 else 12
    return 12 + 9 * (level - 1)


def table_addr(level: int) -> int:
    return TABLE_BASE + level * 0x1000


def index_of(mode: str, level: int) -> int:
    if mode == BITS32:
        return INDEX_32[level]
    if mode == PAE and level == 3:
        return INDEX_PAE_PDPT
    return INDEX[level]


@lru_cache(maxsize=None)
def probe_vaddr(mode: str) -> int:
    return sum(index_of(mode, lvl) << level_shift(mode, lvl) for lvl in MODE_LEVELS[mode]) + OFFSET


@lru_cache(maxsize=None)
def entry_addr(mode: str, level: int) -> int:
    return table_addr(level) + index_of(mode, level) * (8 if is_wide(mode) else 4)


def default_flags(mode: str, level: int) -> int:
    """Upper levels not varied by a case: P|W|U|A (a PAE PDPTE has only P: its
    W/U/A positions are reserved, SDM table 4-8)."""
    if mode == PAE and level == 3:
        return P
    return P | W | U | A


# ---------------------------------------------------------------------------
# The environment of one check: control registers and the CPU's features


@dataclass(frozen=True)
class Env:
    mode: str
    wp: bool = True             # CR0.WP
    nxe: bool = False           # EFER.NXE
    smep: bool = False          # CR4.SMEP
    smap: bool = False          # CR4.SMAP
    ac: bool = False            # RFLAGS.AC
    pke: bool = False           # CR4.PKE
    pkru: int = 0
    pse: bool = True            # CR4.PSE (32-bit paging only)
    pge: bool = False           # CR4.PGE
    gbpages: bool = True        # CPUID 1 GB pages
    maxphyaddr: int = 40

    def label(self) -> str:
        parts = [name for name in ("wp", "nxe", "smep", "smap", "ac", "pke") if getattr(self, name)]
        if self.pkru:
            parts.append(f"pkru={self.pkru:#x}")
        if self.mode == BITS32 and not self.pse:
            parts.append("nopse")
        if self.pge:
            parts.append("pge")
        if not self.gbpages:
            parts.append("no1g")
        if self.maxphyaddr != 40:
            parts.append(f"maxphyaddr={self.maxphyaddr}")
        return " ".join(parts)

    def registers(self, cr3: int) -> dict:
        cr0 = CR0_PE | CR0_PG | (CR0_WP if self.wp else 0)
        cr4 = ((CR4_PSE if self.pse else 0) | (CR4_PGE if self.pge else 0) | (CR4_SMEP if self.smep else 0)
               | (CR4_SMAP if self.smap else 0) | (CR4_PKE if self.pke else 0))
        efer = EFER_NXE if self.nxe else 0
        if self.mode != BITS32:
            cr4 |= CR4_PAE
        if self.mode in (LEVEL4, LEVEL5):
            efer |= EFER_LME
        if self.mode == LEVEL5:
            cr4 |= CR4_LA57
        return {"cr0": cr0, "cr3": cr3, "cr4": cr4, "efer": efer}


def make_cpu(env: Env, mem, cr3: int | None = None) -> CpuState:
    """A CpuState in ``env``'s paging mode with CR3 at the top table (PAE: the
    PDPTEs are loaded from ``mem`` now, as MOV to CR3 does)."""
    if cr3 is None:
        cr3 = table_addr(MODE_LEVELS[env.mode][0])
    cpu = CpuState(maxphyaddr=env.maxphyaddr, gbpages=env.gbpages)
    cpu.load(mem, **env.registers(cr3))
    cpu.ac = env.ac
    cpu.pkru = env.pkru
    return cpu


# ---------------------------------------------------------------------------
# Accesses


@dataclass(frozen=True)
class Access:
    name: str
    user: bool = False
    write: bool = False
    fetch: bool = False
    implicit: bool = False

    @property
    def flags(self) -> int:
        """The access as the model's translate() takes it."""
        return ((ACC_USER if self.user else 0) | (ACC_WRITE if self.write else 0)
                | (ACC_FETCH if self.fetch else 0) | (ACC_IMPLICIT if self.implicit else 0))


USER_READ = Access("user-read", user=True)
USER_WRITE = Access("user-write", user=True, write=True)
USER_FETCH = Access("user-fetch", user=True, fetch=True)
SUP_READ = Access("read")
SUP_WRITE = Access("write", write=True)
SUP_FETCH = Access("fetch", fetch=True)
IMPLICIT_READ = Access("implicit-read", implicit=True)
IMPLICIT_WRITE = Access("implicit-write", write=True, implicit=True)
ACCESSES = (USER_READ, USER_WRITE, USER_FETCH, SUP_READ, SUP_WRITE, SUP_FETCH, IMPLICIT_READ, IMPLICIT_WRITE)


# ---------------------------------------------------------------------------
# Naming


_FLAG_NAMES = ((P, "P"), (W, "W"), (U, "U"), (PWT, "PWT"), (PCD, "PCD"), (A, "A"), (D, "D"), (PS, "PS"),
               (G, "G"), (NX, "NX"))
_NAMED = P | W | U | PWT | PCD | A | D | PS | G | NX


def flag_str(mode: str, value: int) -> str:
    """'P|W|U|NX', other bits as 'b40', an IA-32e protection key as 'pkey=5'."""
    names = [n for b, n in _FLAG_NAMES if value & b]
    rest = value & ~_NAMED
    if mode in (LEVEL4, LEVEL5) and rest & bits(59, 62):
        names.append(f"pkey={(rest >> PKEY_SHIFT) & 0xF}")
        rest &= ~bits(59, 62)
    names += [f"b{i}" for i in range(64) if rest >> i & 1]
    return "|".join(names) or "0"


def entry_str(mode: str, value: int) -> str:
    """An entry in memory: '0xc0000e1 (P|A|D|PS)' (the flag names of bits 11:0 and 63)."""
    return f"{value:#x} ({flag_str(mode, value & (bits(0, 11) | NX))})"


def case_id(env: Env, flags: dict, access: Access) -> str:
    """'4-level pte=P|W|U|NX pde=P|U access=user-write wp nxe' (levels not varied omitted)."""
    parts = [env.mode]
    for lvl in MODE_LEVELS[env.mode][::-1]:
        if lvl in flags:
            parts.append(f"{LEVEL_NAMES[lvl]}={flag_str(env.mode, flags[lvl])}")
    parts.append(f"access={access.name}")
    label = env.label()
    if label:
        parts.append(label)
    return " ".join(parts)


# ---------------------------------------------------------------------------
# The rules (SDM 4.3-4.8), written out plainly


def maps_page(env: Env, level: int, value: int) -> bool:
    """Does this present entry map a page (a leaf) rather than reference a table?

    - a PTE always maps a 4 KB page;
    - a PDE with PS=1 maps a 2 MB page (PAE, IA-32e) or a 4 MB page (32-bit paging
      with CR4.PSE=1); with CR4.PSE=0 the PS bit of a 32-bit PDE is ignored;
    - an IA-32e PDPTE with PS=1 maps a 1 GB page if the CPU has 1 GB pages
      (otherwise PS is reserved there);
    - PS is reserved in a PML4E and a PML5E: never a leaf."""
    if level == 1:
        return True
    if level == 2 and value & PS:
        return env.mode != BITS32 or env.pse
    if level == 3 and value & PS and env.mode in (LEVEL4, LEVEL5):
        return env.gbpages
    return False


@lru_cache(maxsize=None)
def reserved_bits(env: Env, level: int, leaf: bool) -> int:
    """The bits that must be 0 in a present entry (SDM tables 4-4 .. 4-20)."""
    m = env.maxphyaddr
    if env.mode == BITS32:
        if level == 2 and leaf:
            # 4 MB page (PSE-36): bits (M'-20):13 are physical-address bits (M'-1):32 with
            # M' = min(MAXPHYADDR, 40); bits 21:(M'-19) are reserved.
            m36 = min(m, 40)
            return bits(m36 - 19, 21)
        return 0                        # 4-byte entries have no reserved bits otherwise
    rsvd = bits(m, 51)                  # physical-address bits at or above MAXPHYADDR
    if env.mode == PAE:
        rsvd |= bits(52, 62)            # PAE entries: 62:MAXPHYADDR all reserved
    if not env.nxe:
        rsvd |= NX                      # bit 63 is XD only with EFER.NXE
    if level == 2 and leaf:
        rsvd |= bits(13, 20)            # 2 MB page: 20:13 reserved (bit 12 is PAT)
    if level == 3 and leaf:
        rsvd |= bits(13, 29)            # 1 GB page: 29:13 reserved (bit 12 is PAT)
    if level >= 4:
        rsvd |= PS                      # PML4E / PML5E: PS must be 0
    if level == 3 and not leaf and env.mode in (LEVEL4, LEVEL5) and not env.gbpages:
        rsvd |= PS                      # no 1 GB pages: PS in a PDPTE is reserved
    return rsvd


def leaf_base(env: Env, level: int, value: int) -> tuple[int, int]:
    """(physical base, page shift) of the page a leaf entry maps."""
    shift = level_shift(env.mode, level)
    if env.mode == BITS32:
        if level == 2:
            m36 = min(env.maxphyaddr, 40)
            high = (value >> 13) & bits(0, m36 - 33)         # bits (M'-20):13 -> address (M'-1):32
            return (value & bits(22, 31)) | (high << 32), 22
        return value & bits(12, 31), 12
    return value & bits(shift, env.maxphyaddr - 1), shift


@dataclass(frozen=True)
class Outcome:
    """What the SDM says an access does.  ``error_code`` is None on success;
    ``final`` maps level -> entry value in memory after the access."""
    error_code: int | None
    final: dict
    paddr: int | None = None
    page_shift: int | None = None
    writable: bool | None = None
    user: bool | None = None
    executable: bool | None = None

    def describe(self) -> str:
        if self.error_code is None:
            return f"ok paddr={self.paddr:#x} size=2^{self.page_shift}"
        return f"#PF error code {self.error_code:#x} ({ec_str(self.error_code)})"


def ec_str(code: int) -> str:
    names = ((EC_P, "P"), (EC_W, "W"), (EC_U, "U"), (EC_RSVD, "RSVD"), (EC_ID, "I/D"), (EC_PK, "PK"))
    return "|".join(n for b, n in names if code & b) or "0"


def expected_outcome(env: Env, values: dict, vaddr: int, access: Access) -> Outcome:
    """Walk ``values`` (level -> entry, the chain the builder wrote, each non-leaf
    entry referencing the next level's table) by the SDM's rules.

    Error code: W, U describe the access; I/D is reported for a fetch only when
    CR4.SMEP=1 or (CR4.PAE=1 and EFER.NXE=1).  Walk, top down:
      - an entry with P=0: #PF, P clear; the entry and those below unchanged;
      - a present entry with a reserved bit set: #PF with RSVD|P;
      - a non-leaf entry that passed both checks gains A at once (QEMU does this;
        the SDM allows it), even if the walk faults further down.
    Then the access rights (AND of R/W and U/S over the levels used, XD of any level):
      - user access: the page must be user (U=1 at every level); a write needs W=1 at
        every level; a fetch needs no XD at any level (with EFER.NXE);
      - supervisor fetch: no XD at any level; with CR4.SMEP, not a user page;
      - supervisor data access: with CR4.SMAP, a user page faults unless the access
        is explicit and RFLAGS.AC=1; a write needs W=1 at every level when CR0.WP=1;
      - protection keys (IA-32e, CR4.PKE), data accesses to a user page only: PKRU.AD
        of the leaf's key denies, PKRU.WD denies writes (user writes; supervisor writes
        only with CR0.WP=1).  PK is set whenever the key denies (SDM 4.7).
    A rights fault has P set (and PK as above) and leaves the leaf unchanged.
    Success: the leaf gains A, and D on a write."""
    mode = env.mode
    ec = (EC_W if access.write else 0) | (EC_U if access.user else 0)
    if access.fetch and (env.smep or (mode != BITS32 and env.nxe)):
        ec |= EC_ID
    final = dict(values)
    used = []
    leaf_level = None
    for level in MODE_LEVELS[mode]:
        e = values[level]
        if mode == PAE and level == 3:
            # The PDPTE register: loaded (and checked for reserved bits) at CR3 load;
            # it has no R/W, U/S, XD or A to apply.
            if not e & P:
                return Outcome(ec, final)
            continue
        if not e & P:
            return Outcome(ec, final)
        leaf = maps_page(env, level, e)
        if e & reserved_bits(env, level, leaf):
            return Outcome(ec | EC_RSVD | EC_P, final)
        used.append(e)
        if leaf:
            leaf_level = level
            break
        final[level] = e | A
    leaf_value = values[leaf_level]

    user_page = all(e & U for e in used)
    writable = all(e & W for e in used)
    executable = not (is_wide(mode) and env.nxe and any(e & NX for e in used))

    fault = False
    if access.user:
        if not user_page:
            fault = True
        elif access.write and not writable:
            fault = True
        elif access.fetch and not executable:
            fault = True
    elif access.fetch:
        if not executable:
            fault = True
        elif env.smep and user_page:
            fault = True
    else:
        if env.smap and user_page and (access.implicit or not env.ac):
            fault = True
        elif access.write and not writable and env.wp:
            fault = True

    pk = False
    if env.pke and mode in (LEVEL4, LEVEL5) and user_page and not access.fetch:
        key = (leaf_value >> PKEY_SHIFT) & 0xF
        access_disable = (env.pkru >> (2 * key)) & 1
        write_disable = (env.pkru >> (2 * key + 1)) & 1
        if access_disable:
            pk = True
        elif write_disable and access.write and (access.user or env.wp):
            pk = True

    if fault or pk:
        return Outcome(ec | EC_P | (EC_PK if pk else 0), final)

    final[leaf_level] = leaf_value | A | (D if access.write else 0)
    base, shift = leaf_base(env, leaf_level, leaf_value)
    return Outcome(None, final, base | (vaddr & bits(0, shift - 1)), shift, writable, user_page, executable)


# ---------------------------------------------------------------------------
# The builder


@dataclass
class Layout:
    """The chain of entries the builder wrote for the test address."""
    env: Env
    vaddr: int
    values: dict            # level -> entry value as written
    addrs: dict             # level -> physical address of the entry
    leaf_level: int         # the level the test's own rules make the leaf (maps_page)
    table_frames: frozenset = field(default_factory=frozenset)


def build(env: Env, flags: dict) -> tuple[PhysicalMemory, Layout]:
    """A fresh PhysicalMemory holding the chain for the test address.

    ``flags`` maps level -> the entry's bits other than the address (any level
    left out gets ``default_flags``).  The address in each entry is the next
    level's table, or the leaf frame of the page size at the first level the
    rules make a leaf; levels below the leaf are not written."""
    mode = env.mode
    mem = PhysicalMemory(MEMORY_SIZE, env.maxphyaddr)
    values, addrs, frames = {}, {}, set()
    leaf_level = 1
    for level in MODE_LEVELS[mode]:
        f = flags.get(level, default_flags(mode, level))
        leaf = maps_page(env, level, f | P) and not (mode == PAE and level == 3)
        target = LEAF_FRAME[level_shift(mode, level)] if leaf else table_addr(level - 1)
        value = f | target
        a = entry_addr(mode, level)
        if is_wide(mode):
            mem.write_u64(a, value)
        else:
            mem.write_u32(a, value)
        values[level], addrs[level] = value, a
        frames.add(a >> 12)
        if leaf:
            leaf_level = level
            break
    return mem, Layout(env, probe_vaddr(mode), values, addrs, leaf_level, frozenset(frames))


def read_entry(mem, mode: str, addr: int) -> int:
    return mem.read_u64(addr) if is_wide(mode) else mem.read_u32(addr)


# ---------------------------------------------------------------------------
# Running one case against the model

_EXPECTED: dict = {}


def expected(env: Env, values: dict, vaddr: int, access: Access) -> Outcome:
    """expected_outcome, memoised (a matrix asks the same question many times)."""
    key = (env, tuple(sorted(values.items())), vaddr, access)
    out = _EXPECTED.get(key)
    if out is None:
        if len(_EXPECTED) > 200_000:
            _EXPECTED.clear()
        out = _EXPECTED[key] = expected_outcome(env, values, vaddr, access)
    return out


def restore(mem, layout: Layout) -> None:
    """Put the entries back as the builder wrote them (same frames as a fresh build)."""
    for level, addr in layout.addrs.items():
        if is_wide(layout.env.mode):
            mem.write_u64(addr, layout.values[level])
        else:
            mem.write_u32(addr, layout.values[level])


class CpuCache:
    """CpuState per environment (building one is the slow part).  A PAE CPU holds
    the PDPTE registers, so it is keyed by the PDPTE value too (all builds put
    that PDPTE at the same address)."""

    def __init__(self):
        self._cpus = {}

    def get(self, env: Env, mem, layout: Layout) -> CpuState:
        key = (env, layout.values.get(3) if env.mode == PAE else None)
        cpu = self._cpus.get(key)
        if cpu is None:
            cpu = self._cpus[key] = make_cpu(env, mem)
        return cpu


def model_access(mem, cpu, vaddr: int, access: Access, tlb=None):
    """(error code or None, result) from the model: a Translation from a walk, or the
    physical address from ``tlb.translate`` when a Tlb is given."""
    cpu.cpl = 3 if access.user else 0
    try:
        if tlb is not None:
            return None, tlb.translate(mem, cpu, vaddr, access.flags)
        return None, translate(mem, cpu, vaddr, access.flags)
    except PageFault as pf:
        if pf.address != vaddr:
            return ("bad-cr2", pf.address), None
        return pf.error_code, None


def compare(exp: Outcome, got_ec, result, mem, layout: Layout) -> list[str]:
    """Differences between the expected outcome and the model's, memory included."""
    problems = []
    mode = layout.env.mode
    paddr = result if isinstance(result, int) else getattr(result, "paddr", None)
    if exp.error_code != got_ec:
        if got_ec is None:
            got = f"ok paddr={paddr:#x}"
        elif isinstance(got_ec, int):
            got = f"#PF error code {got_ec:#x} ({ec_str(got_ec)})"
        else:
            got = f"#PF with CR2 {got_ec[1]:#x} instead of the test address"
        problems.append(f"expected {exp.describe()}, got {got}")
    elif isinstance(result, int):
        if paddr != exp.paddr:
            problems.append(f"paddr: expected {exp.paddr:#x}, got {paddr:#x}")
    elif result is not None:
        want = (exp.paddr, exp.page_shift, exp.writable, exp.user, exp.executable)
        have = (result.paddr, result.page_shift, result.writable, result.user, result.executable)
        if want != have:
            problems.append(f"translation (paddr, shift, W, U, X): expected {want}, got {have}")
    for level, addr in layout.addrs.items():
        now = read_entry(mem, mode, addr)
        if now != exp.final[level]:
            problems.append(f"{LEVEL_NAMES[level]} in memory: expected {entry_str(mode, exp.final[level])}, "
                            f"got {entry_str(mode, now)}")
    if set(mem.allocated_frames()) != set(layout.table_frames):
        problems.append(f"memory outside the tables was written: frames {mem.allocated_frames()}")
    return problems


# Accesses tried, in order, to put the page in the TLB before a TLB-path check.
PRIMING = (SUP_READ, USER_READ, IMPLICIT_READ, SUP_FETCH, USER_FETCH)


def check_case(env: Env, flags: dict, access: Access, cpus: CpuCache, *, tlb: bool = False) -> list[str]:
    """Build, access twice by walks, comparing each time with the rules.  With ``tlb``,
    also from the tables as built: prime a Tlb with the first read or fetch the rules allow, then
    do the access twice through it (a TLB hit must decide with the cached rights and the
    current registers exactly as a walk would).  Returns problems."""
    mem, layout = build(env, flags)
    cpu = cpus.get(env, mem, layout)
    exp = expected(env, layout.values, layout.vaddr, access)
    got_ec, t = model_access(mem, cpu, layout.vaddr, access)
    problems = compare(exp, got_ec, t, mem, layout)
    if problems:
        return problems
    # "twice": the same access again, with A (and D) now set where the first one set them.
    exp2 = expected(env, exp.final, layout.vaddr, access)
    assert (exp2.error_code, exp2.final, exp2.paddr) == (exp.error_code, exp.final, exp.paddr), \
        "the rules themselves must be idempotent"
    got_ec, t = model_access(mem, cpu, layout.vaddr, access)
    problems = [f"second access: {p}" for p in compare(exp2, got_ec, t, mem, layout)]
    if problems or not tlb:
        return problems

    for prime in PRIMING:
        primed = expected(env, layout.values, layout.vaddr, prime)
        if primed.error_code is None:
            break
    else:
        return []                               # nothing can be cached: a TLB holds no faults
    restore(mem, layout)
    buffer = Tlb()
    got_ec, paddr = model_access(mem, cpu, layout.vaddr, prime, buffer)
    problems = [f"tlb priming {prime.name}: {p}" for p in compare(primed, got_ec, paddr, mem, layout)]
    for attempt in ("first", "second"):
        if problems:
            return problems
        exp = expected(env, primed.final, layout.vaddr, access)
        got_ec, paddr = model_access(mem, cpu, layout.vaddr, access, buffer)
        problems = [f"{attempt} access through a tlb primed by {prime.name}: {p}"
                    for p in compare(exp, got_ec, paddr, mem, layout)]
        primed = exp
    return problems


def run_matrix(cases, *, tlb: bool = False) -> tuple[int, list[str]]:
    """Run (env, flags, access) cases; return (count, failure reports)."""
    cpus = CpuCache()
    n = 0
    failures = []
    for env, flags, access in cases:
        n += 1
        problems = check_case(env, flags, access, cpus, tlb=tlb)
        if problems:
            failures.append(f"{case_id(env, flags, access)}: " + "; ".join(problems))
    return n, failures


def report(name: str, n: int, failures: list[str], limit: int = 25) -> str:
    head = f"{name}: {len(failures)} of {n} cases disagree with the SDM rules"
    return "\n".join([head, *failures[:limit], *(["..."] if len(failures) > limit else [])])



# ---------------------------------------------------------------------------
# Hand-built tables for the named sub-cases


def index_at(mode: str, level: int, vaddr: int) -> int:
    """The index ``vaddr`` uses in a table of ``level``."""
    if mode == BITS32:
        return (vaddr >> level_shift(mode, level)) & 0x3FF
    if mode == PAE and level == 3:
        return (vaddr >> 30) & 3
    return (vaddr >> level_shift(mode, level)) & 0x1FF


def canonical(mode: str, vaddr: int) -> int:
    """Sign-extend an IA-32e linear address from bit 47 (4-level) or 56 (5-level)."""
    top = {LEVEL4: 47, LEVEL5: 56}.get(mode)
    if top is not None and vaddr >> top & 1:
        vaddr |= bits(top + 1, 63)
    return vaddr


def compose(mode: str, indexes: dict, offset: int = 0) -> int:
    """A linear address from level -> index (levels left out use index 0)."""
    va = sum(idx << level_shift(mode, lvl) for lvl, idx in indexes.items()) + offset
    return canonical(mode, va)


class Tables:
    """Paging structures written by hand: table frames are handed out upwards
    from 0x20_0000; ``root`` is what CR3 holds (PAE: a PDPT at its start)."""

    def __init__(self, env: Env, mem_size: int = MEMORY_SIZE):
        self.env = env
        self.mode = env.mode
        self.mem = PhysicalMemory(mem_size, env.maxphyaddr)
        self.esize = 8 if is_wide(env.mode) else 4
        self._next = 0x20_0000
        self.root = self.alloc()

    def alloc(self) -> int:
        addr = self._next
        self._next += 0x1000
        return addr

    def get(self, addr: int) -> int:
        return read_entry(self.mem, self.mode, addr)

    def put(self, addr: int, value: int) -> None:
        if self.esize == 8:
            self.mem.write_u64(addr, value)
        else:
            self.mem.write_u32(addr, value)

    def slot(self, table: int, level: int, vaddr: int) -> int:
        """Physical address of the entry for ``vaddr`` in the ``level`` table at ``table``."""
        return table + index_at(self.mode, level, vaddr) * self.esize

    def map(self, vaddr: int, leaf_level: int, leaf_flags: int, frame: int,
            table_flags: int | None = None) -> dict:
        """Map ``vaddr`` with a leaf at ``leaf_level`` (PS added above level 1), creating
        missing tables with ``table_flags`` (default P|W|U; P for a PAE PDPTE).
        Returns level -> entry address."""
        addrs = {}
        table = self.root
        for level in MODE_LEVELS[self.mode]:
            addr = self.slot(table, level, vaddr)
            addrs[level] = addr
            if level == leaf_level:
                self.put(addr, frame | leaf_flags | (PS if level > 1 else 0))
                return addrs
            value = self.get(addr)
            if not value & P:
                flags = table_flags if table_flags is not None else (
                    P if self.mode == PAE and level == 3 else P | W | U)
                value = self.alloc() | flags
                self.put(addr, value)
            table = value & bits(12, 51)
        raise AssertionError("leaf level not reached")

    def cpu(self, env: Env | None = None) -> CpuState:
        return make_cpu(env or self.env, self.mem, cr3=self.root)
