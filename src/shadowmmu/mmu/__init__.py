"""``shadowmmu.mmu``: the hypervisor's shadow MMU (KVM, 2007, with its later fixes)."""

from .audit import AuditError, audit
from .mmu import POLICIES, MMUError, PfResult, ShadowMMU
from .shadow_page import ShadowPage
from .spte import Role

__all__ = ["AuditError", "audit", "PfResult", "POLICIES", "MMUError", "ShadowMMU", "ShadowPage", "Role"]
