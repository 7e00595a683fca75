"""A walk told the way a person debugging page tables wants to read it."""

from __future__ import annotations

from .bits import (
    ACC_FETCH, ACC_IMPLICIT, ACC_USER, ACC_WRITE, CR0_WP, CR4_SMAP, CR4_SMEP, EFER_NXE, ENTRY_FLAG_NAMES,
    PF_ID, PF_P, PF_PK, PF_RSVD, PTE_NX, PTE_P, PTE_PKEY_SHIFT, PTE_PS, PTE_U, PTE_W, R_U, R_W, R_X,
    describe_error_code,
)
from .cpu import CpuState
from .faults import NonCanonicalAddress, PageFault
from .formats import LEVEL_NAMES, PagingMode
from .walker import PAGE_SIZE_NAMES, translate


def decode_entry(value: int, wide: bool, leaf: bool) -> str:
    names = [n for bit, n in ENTRY_FLAG_NAMES if value & bit and (wide or bit < 1 << 32)]
    if leaf and wide and value >> PTE_PKEY_SHIFT & 0xF:
        names.append(f"PKEY={value >> PTE_PKEY_SHIFT & 0xF}")
    if not value & PTE_P:
        return "not present"
    addr = value & (0x000FFFFFFFFFF000 if wide else 0xFFFFF000)
    return f"{'|'.join(names)} -> {addr:#x}"


def access_name(access: int) -> str:
    kind = "fetch" if access & ACC_FETCH else "write" if access & ACC_WRITE else "read"
    return f"{'user' if access & ACC_USER else 'supervisor'} {kind}"


def narrate(mem, cpu: CpuState, vaddr: int, access: int = 0, *, set_ad: bool = False) -> list[str]:
    """Lines describing the walk of vaddr, each level and the outcome.  By default the
    walk does not set A/D (a debugger must not change what it inspects)."""
    lines = [f"{access_name(access)} of {vaddr:#x}; {cpu.describe()}"]
    if cpu.mode is PagingMode.NONE:
        lines.append(f"paging is off: physical address = {vaddr:#x}")
        return lines
    names = LEVEL_NAMES[cpu.mode]
    wide = cpu.format.entry_size == 8
    try:
        t = translate(mem, cpu, vaddr, access, set_ad=set_ad)
        entries, fault = t.entries, None
    except PageFault as pf:
        entries, fault, t = pf.entries, pf, None
    except NonCanonicalAddress as gp:
        lines.append(f"#GP: {gp}")
        return lines
    for i, (level, addr, value, _) in enumerate(entries):
        leaf = (level == 1 or bool(value & PTE_PS)) and i == len(entries) - 1
        lines.append(f"  {names[level]:<6} @ {addr:#014x} = {value:#018x}  {decode_entry(value, wide, leaf)}")
    if fault is not None:
        note = ""
        if access & ACC_FETCH and not fault.error_code & PF_ID:
            note = " (this was a fetch: I/D is reported only with EFER.NXE=1 in a PAE-format walk or CR4.SMEP=1)"
        lines.append(f"#PF at {fault.address:#x}: error code {describe_error_code(fault.error_code)}{note}")
        lines.append(f"   because {fault_rule(cpu, access, entries, fault.error_code)}")
    else:
        rights = "".join(c if t.rights & r else "-" for c, r in (("W", R_W), ("U", R_U), ("X", R_X)))
        lines.append(f"=> physical {t.paddr:#x} ({PAGE_SIZE_NAMES[t.page_shift]} page, rights {rights}"
                     f"{', pkey %d' % t.pkey if t.pkey else ''}{', global' if t.global_page else ''})")
    return lines


def fault_rule(cpu: CpuState, access: int, entries, error_code: int) -> str:
    """The rule of SDM 4.6-4.7 behind a #PF, in words: which entry, which bit, which
    control-register feature.  ``entries`` are the walk's (level, address, value)."""
    names = LEVEL_NAMES[cpu.mode]
    if not entries:
        return "no paging entry was read"
    level, _, value, _ = entries[-1]
    where = f"the {names[level]}"
    if not error_code & PF_P:
        return f"{where} is not present (P=0)"
    if error_code & PF_RSVD:
        return f"{where} sets reserved bit(s) {', '.join(map(str, _reserved_bits(cpu, level, value)))}"
    if error_code & PF_PK:
        key = value >> PTE_PKEY_SHIFT & 0xF
        ad = cpu.pkru >> (2 * key) & 1
        return (f"protection key {key} of this user page: PKRU.AD{key}=1 denies data accesses" if ad else
                f"protection key {key} of this user page: PKRU.WD{key}=1 denies writes"
                + ("" if access & ACC_USER else " (with CR0.WP=1, supervisor writes too)"))
    # U/S, R/W and XD are ANDed over the levels; a PAE PDPTE (a register) has none of them
    rights_entries = [(lvl, v) for lvl, _, v, _ in entries if not (cpu.mode is PagingMode.PAE and lvl == 3)]
    user_page = all(v & PTE_U for _, v in rights_entries)
    if access & ACC_USER and not user_page:
        lvl = next(lvl for lvl, v in rights_entries if not v & PTE_U)
        return f"U/S=0 in the {names[lvl]}: a supervisor-only page, and this is a user-mode access"
    if access & ACC_FETCH:
        if cpu.efer & EFER_NXE and cpu.format.entry_size == 8:
            nx = [lvl for lvl, v in rights_entries if v & PTE_NX]
            if nx:
                return f"XD=1 in the {names[nx[0]]}: the page is not executable"
        if not access & ACC_USER and user_page and cpu.cr4 & CR4_SMEP:
            return "SMEP: a supervisor-mode fetch from a user page (U=1 at every level)"
    if access & ACC_WRITE:
        ro = [lvl for lvl, v in rights_entries if not v & PTE_W]
        if ro:
            who = "a user-mode write" if access & ACC_USER else "a supervisor write with CR0.WP=1"
            return f"R/W=0 in the {names[ro[0]]}: a read-only page, and this is {who}"
    if not access & (ACC_USER | ACC_FETCH) and user_page and cpu.cr4 & CR4_SMAP:
        why = "an implicit supervisor access" if access & ACC_IMPLICIT else "EFLAGS.AC=0"
        return f"SMAP: a supervisor-mode data access to a user page ({why})"
    return f"a protection rule (error code {error_code:#x}, CR0.WP={int(bool(cpu.cr0 & CR0_WP))})"


def _reserved_bits(cpu: CpuState, level: int, value: int) -> list[int]:
    """The bit positions of ``value`` reserved at ``level`` (the walk's own masks)."""
    for row in cpu.rows:
        if row[0] == level:
            mask = row[4] if value & PTE_PS and row[4] != -1 else row[3]
            return [b for b in range(64) if (value & mask) >> b & 1]
    return []
