"""A walk told the way a person debugging page tables wants to read it."""

from __future__ import annotations

from .bits import (
    ACC_FETCH, ACC_USER, ACC_WRITE, ENTRY_FLAG_NAMES, PTE_P, PTE_PKEY_SHIFT, PTE_PS, describe_error_code,
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
    for i, (level, addr, value) in enumerate(entries):
        leaf = (level == 1 or bool(value & PTE_PS)) and i == len(entries) - 1
        lines.append(f"  {names[level]:<6} @ {addr:#014x} = {value:#018x}  {decode_entry(value, wide, leaf)}")
    if fault is not None:
        lines.append(f"#PF at {fault.address:#x}: error code {describe_error_code(fault.error_code)}")
    else:
        rights = "".join(c if ok else "-" for c, ok in (("W", t.writable), ("U", t.user), ("X", t.executable)))
        lines.append(f"=> physical {t.paddr:#x} ({PAGE_SIZE_NAMES[t.page_shift]} page, rights {rights}"
                     f"{', pkey %d' % t.pkey if t.pkey else ''}{', global' if t.global_page else ''})")
    return lines
