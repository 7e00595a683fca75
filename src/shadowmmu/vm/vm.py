"""The virtual machine: guest RAM in memslots, MMIO regions, vCPUs and the MMU."""

from __future__ import annotations

from ..mmu.audit import audit
from ..mmu.mmu import ShadowMMU
from ..mmu.policy import parse_policy
from ..mmu.tdp import TdpMMU
from ..x86.memory import physical_memory
from .events import EventLog
from .memslots import GuestPhysical, Memslot, MmioRegion
from .vcpu import VCpu

# Host layout: the shadow page pool (and the vCPUs' PAE root tables, which a 32-bit
# CR3 must reach) from this frame up, below 4 GB; guest RAM after it, so a gpa is
# never accidentally an hpa.
POOL_HOST_BASE_PFN = 0x100
MAX_RAM = 64 << 30
# The host CPU's physical-address width (a server of the Haswell..Ice Lake class).  It
# matters to bypass: the trap spte (spte.SPTE_TRAP) faults because bits 51:46 are
# reserved; with 52 address bits a level-1 entry has no reserved bit left at all.
HOST_MAXPHYADDR = 46


class VM:
    """A VM with ``ram_size`` bytes of guest RAM at gpa 0 (lazily backed).

    ``native=True``: no hypervisor, the hardware walks the guest's own tables.
    Otherwise a shadow MMU whose pte-write ``policy`` is "zap" (before the seed) or
    "update" (the seed), as the command line's ``--policy``; ``pte_write`` is the
    same knob under the name the MMU gives it.  ``seed_access_bug`` restores the
    seed's update_pte rights; ``pool_pages`` bounds the shadow page pool;
    ``audit`` sets the MMU's audit points (see ShadowMMU).
    ``memory`` is the host memory's backend: "dict" (a bytearray per frame) or
    "mmap" (one anonymous mapping, see ``x86.memory.MappedPhysicalMemory``).
    ``vm.policy`` and ``vm.exits`` (exits by reason) read the result back.
    ``prefetch``: pte prefetch group (0 off, KVM's 8; see ``ShadowMMU.prefetch``).
    ``nr_vcpus=0``: the caller attaches its own vCPU (the real one, ``vm.real_cpu``).
    ``policy="tdp"``: two-dimensional paging (EPT), no shadow tables: a ``TdpMMU``
    whose EPT pages come from the same bounded pool (``mmu/tdp.py``)."""

    def __init__(self, ram_size: int = 256 << 20, *, native: bool = False, policy: str | None = None,
                 pte_write: str | None = None, seed_access_bug: bool = False, pool_pages: int = 4096,
                 nr_vcpus: int = 1, maxphyaddr: int = 40, tracing: bool = False,
                 audit: bool | int | None = None, memory: str = "dict", prefetch: int = 0):
        if policy == "native":                   # the run's mode as the command line names it
            native, policy = True, None
        if policy is not None and pte_write is not None and policy != pte_write:
            raise ValueError(f"policy={policy!r} and pte_write={pte_write!r} name the same knob: give one")
        spec = parse_policy(policy or pte_write or "update")
        if spec.tdp and (prefetch or seed_access_bug):
            raise ValueError("prefetch and seed_access_bug are shadow-MMU options; tdp shadows no guest table")
        if prefetch:
            spec = spec._replace(prefetch=prefetch)
        if not isinstance(ram_size, int) or ram_size <= 0 or ram_size % 4096:
            raise ValueError(f"guest RAM size must be a positive multiple of 4096 bytes, got {ram_size!r}")
        if ram_size > MAX_RAM:
            raise ValueError(f"guest RAM size {ram_size:#x} exceeds the 64 GiB this model supports")
        if ram_size > 1 << maxphyaddr:
            raise ValueError(f"guest RAM of {ram_size:#x} bytes does not fit in {maxphyaddr} physical address bits")
        if nr_vcpus < 0:
            raise ValueError(f"nr_vcpus must be 0 or more, got {nr_vcpus}")
        self.native = native
        self.tdp = not native and spec.tdp
        self.maxphyaddr = maxphyaddr
        self.ram_pages = ram_size >> 12
        if not native and POOL_HOST_BASE_PFN + pool_pages + nr_vcpus > 1 << 20:
            raise ValueError(f"a pool of {pool_pages} shadow pages does not fit below 4 GB")
        pool_base = POOL_HOST_BASE_PFN
        extra = 0 if native else pool_pages + nr_vcpus
        ram_base = pool_base + extra
        self.host = physical_memory((ram_base + self.ram_pages) << 12, maxphyaddr=HOST_MAXPHYADDR, backend=memory)
        self.slots = [Memslot(0, self.ram_pages, ram_base, id=0)]
        self.mmio: list[MmioRegion] = []
        self.gmem = GuestPhysical(self.host, self.slots, self.mmio)
        self.events = EventLog(tracing)
        self.mmu = None
        if self.tdp:
            self.mmu = TdpMMU(self.host, self.gmem, list(range(pool_base, pool_base + extra)), events=self.events,
                              audit=audit)
        elif not native:
            self.mmu = ShadowMMU(self.host, self.gmem, list(range(pool_base, pool_base + extra)),
                                 pte_write=spec.pte_write, seed_access_bug=seed_access_bug, events=self.events,
                                 audit=audit, prefetch=spec.prefetch, bypass=spec.bypass, unsync=spec.unsync)
        self.vcpus = [VCpu(self, i) for i in range(nr_vcpus)]

    @property
    def vcpu(self) -> VCpu:
        return self.vcpus[0]

    @property
    def policy(self) -> str:
        if self.native:
            return "native"
        return self.mmu.spec.name

    def add_mmio(self, gpa: int, size: int, handler, name: str = "mmio") -> None:
        """A device at [gpa, gpa+size): handler.read(gpa, size) / handler.write(gpa, size, value)."""
        if gpa < self.ram_pages << 12:
            raise ValueError(f"MMIO region at {gpa:#x} overlaps guest RAM (which ends at {self.ram_pages << 12:#x})")
        self.mmio.append(MmioRegion(gpa, size, handler, name))

    def audit(self) -> None:
        if self.mmu is not None:
            audit(self.mmu)

    def guest_memory(self) -> dict[int, bytes]:
        """Every non-zero guest RAM page, gfn -> bytes (what the guest could observe)."""
        return self.gmem.snapshot()

    @property
    def exits(self) -> dict[str, int]:
        """VM exits so far, by reason (see vm/events.py for what each reason means)."""
        return self.events.by_reason()
