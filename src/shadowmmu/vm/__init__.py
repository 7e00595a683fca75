"""``shadowmmu.vm``: the virtual machine (memslots, MMIO, vCPUs, exits, trace, native mode)."""

from .events import EXIT_REASONS, EventLog
from .memslots import GuestPhysical, Memslot, MmioRegion
from .vcpu import GuestCrash, VCpu
from .vm import VM

__all__ = ["EXIT_REASONS", "EventLog", "GuestPhysical", "Memslot", "MmioRegion", "GuestCrash", "VCpu", "VM"]
