"""``shadowmmu.x86``: the x86 paging hardware (no virtualization here).

Physical memory, control-register state, the paging formats as data, the
page-table walker with the SDM's permission / reserved-bit / A-D / error-code
rules, and a TLB."""

from .bits import (
    ACC_FETCH, ACC_IMPLICIT, ACC_USER, ACC_WRITE, CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PGE,
    CR4_PKE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_LME, EFER_NXE, PF_ID, PF_P, PF_PK, PF_RSVD, PF_U,
    PF_W, PTE_A, PTE_D, PTE_G, PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W, describe_error_code,
)
from .cpu import CpuState
from .faults import GeneralProtection, NonCanonicalAddress, PageFault, WalkStep
from .formats import FORMATS, PagingFormat, PagingMode
from .frames import Frame, FrameSource, FrameStore
from .memory import MappedPhysicalMemory, PhysicalAddressError, PhysicalMemory, physical_memory
from .tlb import Tlb
from .walker import Translation, translate


class Access:
    """Access kinds for translate(): OR them together.  Plain ints (hot path)."""
    READ = 0
    WRITE = ACC_WRITE
    USER = ACC_USER
    FETCH = ACC_FETCH
    IMPLICIT = ACC_IMPLICIT


__all__ = [
    "Access", "CpuState", "Frame", "FrameSource", "FrameStore", "GeneralProtection", "MappedPhysicalMemory",
    "NonCanonicalAddress", "PageFault", "PagingFormat", "PagingMode", "PhysicalAddressError", "PhysicalMemory",
    "physical_memory", "Tlb", "Translation", "WalkStep", "translate", "FORMATS",
    "describe_error_code",
    # the bit names most callers need, re-exported from .bits
    "ACC_FETCH", "ACC_IMPLICIT", "ACC_USER", "ACC_WRITE", "CR0_PE", "CR0_PG", "CR0_WP", "CR4_LA57",
    "CR4_PAE", "CR4_PGE", "CR4_PKE", "CR4_PSE", "CR4_SMAP", "CR4_SMEP", "EFER_LMA", "EFER_LME", "EFER_NXE",
    "PF_ID", "PF_P", "PF_PK", "PF_RSVD", "PF_U", "PF_W", "PTE_A", "PTE_D", "PTE_G", "PTE_NX", "PTE_P",
    "PTE_PS", "PTE_U", "PTE_W",
]
