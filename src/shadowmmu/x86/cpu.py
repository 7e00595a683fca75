"""Control-register state and everything the paging hardware derives from it.

Writing CR0/CR3/CR4/EFER goes through methods that do what the CPU does at that
moment: reject invalid combinations with #GP, compute the paging mode, load the
four PAE PDPTE registers (and #GP on their reserved bits, SDM 4.4.1), and
precompute the per-level walk rows and the permission table the walker and the
TLB use.  KVM does the same (``update_permission_bitmask`` when CR0/CR4
change); the table is tested against the rule written out plainly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from .bits import (
    CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PGE, CR4_PKE, CR4_PSE, CR4_SMAP, CR4_SMEP,
    EFER_LMA, EFER_LME, EFER_NXE, PTE_NX, PTE_P, PTE_PS, R_U, R_W, R_X, mask,
)
from .faults import GeneralProtection
from .formats import BITS32, FORMATS, LEVEL4, LEVEL5, PAE, PagingFormat, PagingMode

# Index bits of the permission table: the effective rights of a translation
# (R_W|R_U|R_X, bits 0-2) and the access (see access_index()).
A_W, A_U, A_F, A_SMAP_OVERRIDE = 8, 16, 32, 64

# PAE PDPTE reserved bits below MAXPHYADDR: 2:1 and 8:5 (SDM table 4-8).  Bit 63 and
# 62:MAXPHYADDR are added per CPU.
_PDPTE_RSVD_LOW = mask(1, 2) | mask(5, 8)


class LevelRow(NamedTuple):
    """What the walker needs to know about one in-memory level, for the current
    format and CPU state (MAXPHYADDR, EFER.NXE, CR4.PSE, 1 GB page support)."""
    level: int
    shift: int           # the linear-address bit where this level's index starts
    index_mask: int      # 0x3FF (32-bit) or 0x1FF
    rsvd_table: int      # reserved bits of an entry that points to a table
    rsvd_page: int       # reserved bits of an entry that maps a page (PS=1), or -1: PS=1 is no page here
    addr_mask: int       # the entry's physical-address bits


def access_index(access: int, ac: bool) -> int:
    """Map an access (ACC_* bits) to its column in the permission table.

    Bits W (2) and U (4) shift to 8 and 16, FETCH (16) shifts to 32.  The SMAP
    override applies to explicit supervisor data accesses with RFLAGS.AC=1."""
    idx = ((access & 6) << 2) | ((access & 16) << 1)
    if ac and not access & 0x104:   # not user, not implicit
        idx |= A_SMAP_OVERRIDE
    return idx


def permission_faults(rights: int, acc: int, *, wp: bool, smep: bool, smap: bool) -> bool:
    """True if an access with table index ``acc`` to a page with ``rights`` faults
    (U/S, R/W, NX, SMEP, SMAP; protection keys are checked separately)."""
    user_page = bool(rights & R_U)
    if acc & A_U:                                   # user-mode access
        if not user_page:
            return True
        if acc & A_W and not rights & R_W:
            return True
        return bool(acc & A_F and not rights & R_X)
    if acc & A_F:                                   # supervisor fetch
        return not rights & R_X or (smep and user_page)
    if smap and user_page and not acc & A_SMAP_OVERRIDE:
        return True                                 # supervisor data access to a user page
    return bool(acc & A_W and not rights & R_W and wp)


@dataclass
class CpuState:
    """The registers that decide how a linear address is translated.

    Set registers through ``write_cr0/write_cr3/write_cr4/write_efer`` (or
    ``load`` for all at once); reading the fields is free.  ``mem`` is needed
    only to load PAE PDPTEs."""

    cr0: int = CR0_PE
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    cpl: int = 0
    ac: bool = False          # RFLAGS.AC
    pkru: int = 0
    maxphyaddr: int = 52
    gbpages: bool = True      # CPUID.80000001H:EDX.Page1GB
    pdptes: tuple = (0, 0, 0, 0)
    pdpte_addrs: tuple = (0, 0, 0, 0)
    # derived state, recomputed by _update()
    mode: PagingMode = field(default=PagingMode.NONE, init=False)
    format: PagingFormat | None = field(default=None, init=False)
    rows: tuple = field(default=(), init=False)           # LevelRows, top first
    # The same rows as plain tuples, for the walker's loop: CPython unpacks an exact
    # tuple at full speed and a NamedTuple through the iterator protocol (bench walk).
    walk_rows: tuple = field(default=(), init=False)
    perm: bytes = field(default=b"", init=False)
    report_id: bool = field(default=False, init=False)
    pk_active: bool = field(default=False, init=False)

    def __post_init__(self):
        if not 32 <= self.maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr must be between 32 and 52, got {self.maxphyaddr}")
        self._update()

    # --- register writes ------------------------------------------------------
    def load(self, mem=None, *, cr0: int | None = None, cr3: int | None = None, cr4: int | None = None,
             efer: int | None = None, reload_pdptes: bool = True) -> None:
        """Set several registers in the order a boot path does (CR4, EFER, CR3, CR0),
        validating only the final combination.  In PAE mode the PDPTE registers are
        (re)loaded unless ``reload_pdptes`` is False."""
        old = (self.cr0, self.cr3, self.cr4, self.efer, self.pdptes, self.pdpte_addrs)
        if cr4 is not None:
            self.cr4 = cr4
        if efer is not None:
            self.efer = efer
        if cr3 is not None:
            self.cr3 = cr3
        if cr0 is not None:
            self.cr0 = cr0
        try:
            self._validate()
            self._set_lma()
            if self.efer & EFER_LMA and self.cr3 & mask(self.maxphyaddr, 51):
                raise GeneralProtection(f"CR3 {self.cr3:#x} sets address bits at or above MAXPHYADDR "
                                        f"({self.maxphyaddr})")
            if self._pae_legacy() and reload_pdptes:
                self._load_pdptes(mem)
            self._update()
        except GeneralProtection:
            self.cr0, self.cr3, self.cr4, self.efer, self.pdptes, self.pdpte_addrs = old
            self._update()
            raise

    # SDM 4.4.1: which writes load the PAE PDPTEs (CR0.CD/NW/PG; CR4.PAE/PGE/PSE/SMEP; CR3).
    _CR0_PDPTE_BITS = CR0_PG | (1 << 30) | (1 << 29)
    _CR4_PDPTE_BITS = CR4_PAE | CR4_PGE | CR4_PSE | CR4_SMEP

    def write_cr0(self, value: int, mem=None) -> None:
        self.load(mem, cr0=value, reload_pdptes=bool((value ^ self.cr0) & self._CR0_PDPTE_BITS))

    def write_cr3(self, value: int, mem=None) -> None:
        self.load(mem, cr3=value)

    def write_cr4(self, value: int, mem=None) -> None:
        if (self.efer & EFER_LMA) and (value ^ self.cr4) & CR4_LA57:
            raise GeneralProtection("CR4.LA57 cannot change while long mode is active")
        self.load(mem, cr4=value, reload_pdptes=bool((value ^ self.cr4) & self._CR4_PDPTE_BITS))

    def write_efer(self, value: int, mem=None) -> None:
        if (self.cr0 & CR0_PG) and (value ^ self.efer) & EFER_LME:
            raise GeneralProtection("EFER.LME cannot change while paging is enabled")
        self.load(mem, efer=value, reload_pdptes=False)

    def _validate(self) -> None:
        if self.cr0 & CR0_PG and not self.cr0 & CR0_PE:
            raise GeneralProtection("CR0.PG=1 requires CR0.PE=1")
        if self.cr0 & CR0_PG and self.efer & EFER_LME and not self.cr4 & CR4_PAE:
            raise GeneralProtection("long mode (EFER.LME with CR0.PG) requires CR4.PAE")

    def _set_lma(self) -> None:
        if self.cr0 & CR0_PG and self.efer & EFER_LME:
            self.efer |= EFER_LMA
        else:
            self.efer &= ~EFER_LMA

    def _pae_legacy(self) -> bool:
        return bool(self.cr0 & CR0_PG and self.cr4 & CR4_PAE and not self.efer & EFER_LMA)

    def _load_pdptes(self, mem) -> None:
        """SDM 4.4.1: in PAE mode the four PDPTEs are read from the 32-byte
        aligned table at CR3 when CR3 is loaded (and on CR0/CR4 writes that
        switch paging); a present PDPTE with a reserved bit is #GP."""
        if mem is None:
            raise ValueError("loading CR3 in PAE mode reads the PDPTEs: pass the physical memory")
        base = self.cr3 & 0xFFFFFFE0
        rsvd = _PDPTE_RSVD_LOW | PTE_NX | mask(self.maxphyaddr, 62)
        addrs = tuple(base + 8 * i for i in range(4))
        values = tuple(mem.read_u64(a) for a in addrs)
        for i, v in enumerate(values):
            if v & PTE_P and v & rsvd:
                raise GeneralProtection(
                    f"PAE PDPTE{i} at {addrs[i]:#x} = {v:#018x} has reserved bits {v & rsvd:#x} set")
        self.pdptes, self.pdpte_addrs = values, addrs

    # --- derived state --------------------------------------------------------
    def _update(self) -> None:
        cr0, cr4, efer = self.cr0, self.cr4, self.efer
        if not cr0 & CR0_PG:
            self.mode = PagingMode.NONE
        elif efer & EFER_LMA:
            self.mode = PagingMode.LEVEL5 if cr4 & CR4_LA57 else PagingMode.LEVEL4
        elif cr4 & CR4_PAE:
            self.mode = PagingMode.PAE
        else:
            self.mode = PagingMode.BITS32
        self.format = FORMATS.get(self.mode)
        self.rows = self._build_rows()
        self.walk_rows = tuple(map(tuple, self.rows))
        wp, smep, smap = bool(cr0 & CR0_WP), bool(cr4 & CR4_SMEP), bool(cr4 & CR4_SMAP)
        self.perm = bytes(permission_faults(i & 7, i & ~7, wp=wp, smep=smep, smap=smap) for i in range(128))
        # SDM 4.7: I/D is reported only with SMEP, or with NX in a PAE-format walk.
        self.report_id = bool(cr4 & CR4_SMEP or (cr4 & CR4_PAE and efer & EFER_NXE))
        self.pk_active = bool(cr4 & CR4_PKE and efer & EFER_LMA)

    def _build_rows(self) -> tuple:
        """One LevelRow per in-memory level, top first."""
        fmt = self.format
        if fmt is None:
            return ()
        m = self.maxphyaddr
        if fmt is BITS32:
            pse = bool(self.cr4 & CR4_PSE)
            # PSE-36: PDE bits (13 + M' - 32 - 1):13 hold address bits M'-1:32 with
            # M' = min(MAXPHYADDR, 40); the rest of 21:13 is reserved.
            mp = min(m, 40)
            rsvd_4m = mask(13 + mp - 32, 21)
            return (LevelRow(2, 22, 0x3FF, 0, rsvd_4m if pse else -1, 0xFFFFF000),
                    LevelRow(1, 12, 0x3FF, 0, -1, 0xFFFFF000))
        addr_mask = mask(12, m - 1)
        rsvd = mask(m, 51)
        if fmt is PAE:
            rsvd |= mask(52, 62)          # PAE entries have no ignored high bits
        if not self.efer & EFER_NXE:
            rsvd |= PTE_NX
        rows = []
        for level in range(fmt.levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            if level == 1:
                rows.append(LevelRow(1, shift, 0x1FF, rsvd, -1, addr_mask))
            elif level == 2:
                rows.append(LevelRow(2, shift, 0x1FF, rsvd, rsvd | mask(13, 20), addr_mask))
            elif level == 3 and self.gbpages:
                rows.append(LevelRow(3, shift, 0x1FF, rsvd, rsvd | mask(13, 29), addr_mask))
            else:
                # PS is reserved in a PML5E/PML4E (and in a PDPTE without 1 GB pages).
                rows.append(LevelRow(level, shift, 0x1FF, rsvd | PTE_PS, -1, addr_mask))
        return tuple(rows)

    def without_cr4(self, bits: int) -> CpuState:
        """A copy with CR4 ``bits`` cleared and what derives from them recomputed,
        registers otherwise as they are (no #GP checks, no PDPTE reload): an
        observer's view of the state, e.g. the rights a walk reports without
        SMEP/SMAP/PKU in the way.  Not a register write."""
        return replace(self, cr4=self.cr4 & ~bits)       # __post_init__ derives the rest

    @property
    def paging(self) -> bool:
        return self.mode is not PagingMode.NONE

    def describe(self) -> str:
        return (f"mode {self.mode.value}, CR0={self.cr0:#x} CR3={self.cr3:#x} CR4={self.cr4:#x} "
                f"EFER={self.efer:#x} CPL={self.cpl} AC={int(self.ac)} PKRU={self.pkru:#x}")


__all__ = ["CpuState", "LevelRow", "PagingMode", "access_index", "permission_faults", "BITS32", "PAE", "LEVEL4", "LEVEL5"]
