"""The virtual CPU: guest memory accesses and privileged operations.

An access goes where it would on hardware: the TLB, then a walk of the tables
CR3 points at — the guest's own (native mode) or the shadow tables (shadow
mode) — and, in shadow mode, a hardware #PF on the shadow tables is a VM exit
to the MMU, which fixes the shadow and resumes, emulates the access, or injects
a #PF.  An injected fault runs the guest's fault handler (its IDT entry, in
effect) on this vCPU at CPL0; its own accesses are virtualized the same way;
then the access is retried, as the faulting instruction is after an IRET.

    guest access --TLB hit--> memory
        | miss: hardware walk of shadow tables --ok--> fill TLB, memory
        | #PF: VM exit -> mmu.page_fault() -> PfResult, counted as the exit's reason
              FIXED     -> retry                          (exit "pf_fixed")
              INJECT    -> guest handler, then retry      (exit "pf_injected")
              PTE_WRITE, MMIO, EMULATE -> the MMU does the access for the guest
                          (exit "pte_write" | "mmio" | "emulate")
"""

from __future__ import annotations

from collections import Counter

from ..mmu.mmu import MMUError, PfResult
from ..mmu.roots import pf_exits
from ..x86.bits import (
    ACC_FETCH, ACC_USER, ACC_WRITE, CR0_PG, CR4_LA57, CR4_PAE, CR4_PGE, CR4_PKE, CR4_PSE, CR4_SMAP,
    CR4_SMEP, EFER_LME,
)
from ..x86.cpu import A_SMAP_OVERRIDE, CpuState
from ..x86.faults import PageFault
from ..x86.formats import PagingMode
from ..x86.tlb import Tlb
from ..x86.walker import translate

_SIZES = (1, 2, 4, 8)
_FIXED, _INJECT = PfResult.FIXED, PfResult.INJECT
MAX_NESTED_FAULTS = 4        # a fault in a fault handler in a fault handler ... is a triple fault
MAX_FAULT_RETRIES = 32       # an access the guest handler never fixes


class GuestCrash(RuntimeError):
    """The guest did something a real machine would die of (triple fault, a fault
    with no handler deep in the kernel, an access its handler never fixes)."""


class VCpu:
    tlb_class = Tlb                      # the real vCPU's stands for QEMU's TLB

    def __init__(self, vm, index: int = 0):
        self.vm = vm
        self.index = index
        self.native = vm.native
        self.tdp = vm.tdp                 # two-dimensional paging: the hardware walks the guest's tables
        self.gmem = vm.gmem
        self.host = vm.host
        self.guest = CpuState(maxphyaddr=vm.maxphyaddr)    # the registers the guest sees
        self.hw = self.guest if self.native or self.tdp else CpuState(maxphyaddr=vm.host.maxphyaddr)
        self.tlb = self.tlb_class()
        self.events = vm.events
        self.fault_handler = None
        self.cr2 = 0
        self.fault_depth = 0
        self.mmu_roots_invalid = False
        self.mmu_state = None
        self.pfec_filter = None          # bypass: the #PF exit filter (mask, match, bitmap bit 14)
        self.access_hook = None          # see _access
        self.stats: Counter = Counter()
        self._host_frames = vm.host.frames
        self._sync_access()
        if not self.native:
            vm.mmu.attach(self)

    # ---------------------------------------------------------------- helpers
    def _sync_access(self) -> None:
        """Precompute the permission-table columns for this CPL/AC (hot path)."""
        g = self.guest
        user = g.cpl == 3
        self._acc = ACC_USER if user else 0
        r = 16 if user else 0                     # access_index() of a plain read
        if g.ac and not user:
            r |= A_SMAP_OVERRIDE
        self._acc_r = r
        self._acc_w = r | 8
        # native fast path: the first memslot as a range check and an offset
        self._lo, self._hi, self._delta = self.gmem.linear_range()

    # ------------------------------------------------------------- accesses
    def load(self, vaddr: int, size: int = 8) -> int:
        """Read ``size`` bytes (1, 2, 4, 8) at ``vaddr`` at the current CPL."""
        if (vaddr & 0xFFF) + size <= 4096:
            e = self.tlb.small.get(vaddr >> 12)
            hw = self.hw
            if e is not None and not hw.perm[e[1] | self._acc_r] and not hw.pk_active:
                pa = e[0] | (vaddr & 0xFFF)
                if self.native:
                    gfn = pa >> 12
                    if not self._lo <= gfn < self._hi:
                        return self._access(vaddr, size, self._acc, None)
                    pa += self._delta << 12
                f = self._host_frames.get(pa >> 12)
                if f is None:
                    return 0
                off = pa & 0xFFF
                if size == 8 and not off & 7:
                    return f[1][off >> 3]
                if size == 4 and not off & 3:
                    return f[2][off >> 2]
                if size in _SIZES:
                    return int.from_bytes(f[0][off:off + size], "little")
        return self._access(vaddr, size, self._acc, None)

    def store(self, vaddr: int, value: int, size: int = 8) -> None:
        """Write ``size`` bytes of ``value`` at ``vaddr`` at the current CPL."""
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        if (vaddr & 0xFFF) + size <= 4096:
            e = self.tlb.small.get(vaddr >> 12)
            hw = self.hw
            if e is not None and e[2] and not hw.perm[e[1] | self._acc_w] and not hw.pk_active:
                pa = e[0] | (vaddr & 0xFFF)
                if self.native:
                    gfn = pa >> 12
                    if not self._lo <= gfn < self._hi:
                        self._access(vaddr, size, self._acc | ACC_WRITE, value)
                        return
                    pa += self._delta << 12
                off = pa & 0xFFF
                f = self._host_frames.get(pa >> 12)
                if f is None:
                    f = self.host.frame_w(pa >> 12)
                if size == 8 and not off & 7:
                    f[1][off >> 3] = value
                elif size == 4 and not off & 3:
                    f[2][off >> 2] = value
                elif size in _SIZES:
                    f[0][off:off + size] = value.to_bytes(size, "little")
                else:
                    self._access(vaddr, size, self._acc | ACC_WRITE, value)    # says what is wrong
                return
        self._access(vaddr, size, self._acc | ACC_WRITE, value)

    # ------------------------------------------------------ string instructions
    def _bulk_frame(self, vaddr: int, write: bool):
        """(host frame bytes, offset) when the TLB maps vaddr's page to RAM with the
        rights this access needs, so the rest of a string instruction's accesses to
        the page are plain memory accesses (as on hardware: no walk, no exit); else None."""
        e = self.tlb.small.get(vaddr >> 12)
        hw = self.hw
        if e is None or hw.pk_active or hw.perm[e[1] | (self._acc_w if write else self._acc_r)] or (
                write and not e[2]):
            return None
        pa = e[0] | (vaddr & 0xFFF)
        if self.native:
            if not self._lo <= pa >> 12 < self._hi:
                return None
            pa += self._delta << 12
        return self.host.frame_w(pa >> 12)[0], pa & 0xFFF

    def rep_stos(self, vaddr: int, value: int, count: int, size: int = 8) -> None:
        """REP STOS: ``count`` stores of ``value`` (``size`` bytes each) upwards from
        ``vaddr``.  The first store to each page goes through the full access path
        (faults, exits, emulation); the rest of that page is written straight through
        the TLB entry it left, as a CPU does, unless that entry does not allow it."""
        if vaddr % size:
            for i in range(count):
                self.store(vaddr + i * size, value, size)
            return
        pattern = value.to_bytes(size, "little")
        a, end = vaddr, vaddr + count * size
        while a < end:
            page_end = min(end, (a | 0xFFF) + 1)
            self.store(a, value, size)
            a += size
            if a >= page_end:
                continue
            bulk = self._bulk_frame(a, True)
            if bulk is None:
                for b in range(a, page_end, size):
                    self.store(b, value, size)
            else:
                frame, off = bulk
                frame[off:off + page_end - a] = pattern * ((page_end - a) // size)
            a = page_end

    def rep_movs(self, dst: int, src: int, count: int, size: int = 8) -> None:
        """REP MOVS: ``count`` elements of ``size`` bytes from src to dst, upwards.
        Like rep_stos, whole runs within a page go through the TLB entries the first
        element left; overlapping or misaligned copies go element by element."""
        n = count * size
        if dst % size or src % size or (src < dst + n and dst < src + n):
            for i in range(count):
                self.store(dst + i * size, self.load(src + i * size, size), size)
            return
        i = 0
        while i < n:
            run = min(n - i, 4096 - ((dst + i) & 0xFFF), 4096 - ((src + i) & 0xFFF))
            self.store(dst + i, self.load(src + i, size), size)
            rest = run - size
            if rest > 0:
                s_bulk = self._bulk_frame(src + i + size, False)
                d_bulk = self._bulk_frame(dst + i + size, True)
                if s_bulk is None or d_bulk is None:
                    for k in range(i + size, i + run, size):
                        self.store(dst + k, self.load(src + k, size), size)
                else:
                    (sf, so), (df, do) = s_bulk, d_bulk
                    df[do:do + rest] = sf[so:so + rest]
            i += run

    def fetch(self, vaddr: int) -> int:
        """An instruction fetch of one byte at ``vaddr``."""
        return self._access(vaddr, 1, self._acc | ACC_FETCH, None)

    def _access(self, vaddr: int, size: int, access: int, value: int | None):
        """The slow path of every access that misses the TLB fast path, and so of every
        access that faults.  ``access_hook`` (a performance-counter-like observer, e.g.
        per-fault exit accounting) sees each one: hook(inner, vaddr, size, access, value)
        must call inner(vaddr, size, access, value) and return its result."""
        hook = self.access_hook
        if hook is not None:
            return hook(self._access_inner, vaddr, size, access, value)
        return self._access_inner(vaddr, size, access, value)

    def _access_inner(self, vaddr: int, size: int, access: int, value: int | None):
        if size not in (1, 2, 4, 8):
            raise ValueError(f"access size must be 1, 2, 4 or 8 bytes, got {size}")
        tries = 0
        while True:
            try:
                first = 4096 - (vaddr & 0xFFF)
                if first >= size:
                    return self._perform(self._resolve(vaddr, access), size, value)
                # Page-crossing access: both pages are translated before either is
                # touched, so a fault on the second leaves memory unchanged.
                va2 = (vaddr + first) & self._va_mask()
                t1 = self._resolve(vaddr, access)
                t2 = self._resolve(va2, access)
                if value is None:
                    lo = self._perform(t1, first, None)
                    return lo | (self._perform(t2, size - first, None) << (8 * first))
                self._perform(t1, first, value & ((1 << (8 * first)) - 1))
                self._perform(t2, size - first, value >> (8 * first))
                return None
            except PageFault as pf:
                tries += 1
                if tries > MAX_FAULT_RETRIES:
                    raise GuestCrash(f"the guest's fault handler never resolved {pf}") from None
                self._deliver(pf)

    def _va_mask(self) -> int:
        fmt = self.guest.format
        return (1 << 64) - 1 if fmt is not None and fmt.va_bits > 32 else 0xFFFFFFFF

    def _resolve(self, vaddr: int, access: int) -> tuple[int, int]:
        """Where an access lands: (0, host address) for RAM, (1, gpa) for an access
        the hypervisor (shadow) or the bus (native) must carry out."""
        if self.native:
            gpa = self.tlb.translate(self.gmem, self.guest, vaddr, access)
            pfn = self.gmem.gfn_to_pfn(gpa >> 12)
            return (1, gpa) if pfn is None else (0, (pfn << 12) | (gpa & 0xFFF))
        if self.tdp:
            # the combined TLB, then the 2-D walk; a guest #PF propagates (no exit),
            # EPT violations and MMIO exits are the MMU's (mmu/tdp.py)
            return self.vm.mmu.resolve(self, vaddr, access)
        events = self.events
        mmu = self.vm.mmu
        for _ in range(8):
            pa = self.tlb.translate(self.host, self.hw, vaddr, access, probe=True)
            if pa >= 0:
                return 0, pa
            if self.pfec_filter is not None:
                self._bypass(vaddr, access)
            # a hardware #PF on the shadow tables: VM exit
            at = events.mark() if events.tracing else 0
            result = mmu.page_fault(self, vaddr, access)
            events.exits[result.exit_reason] += 1
            if result is _FIXED:
                if events.tracing:
                    events.exit_line("pf_fixed", f"#PF at {vaddr:#x} ({_acc_name(access)}): shadow fixed", at)
                continue
            if result is _INJECT:
                pf = self.mmu_state.fault
                if events.tracing:
                    events.exit_line("pf_injected", f"#PF at {vaddr:#x} ({_acc_name(access)}): "
                                     f"guest fault, inject error code {pf.error_code:#x}", at)
                raise pf
            gpa = self.mmu_state.gpa
            if events.tracing:
                events.exit_line(result.exit_reason, f"{_acc_name(access)} of {vaddr:#x} (gpa {gpa:#x}) emulated",
                                 at)
            return 1, gpa
        raise MMUError(f"the shadow MMU keeps reporting {vaddr:#x} fixed but the hardware still faults")

    def _bypass(self, vaddr: int, access: int) -> None:
        """Bypass (VT-x PFEC mask/match): the hardware's #PF goes straight to the guest,
        with the hardware's error code, when the filter says it does not exit."""
        try:
            translate(self.host, self.hw, vaddr, access, record=False)
        except PageFault as pf:
            if not pf_exits(self.pfec_filter, pf.error_code):
                self.stats["bypassed_faults"] += 1
                if self.events.tracing:
                    self.events.note("#PF bypassed", f"#PF at {vaddr:#x} error code {pf.error_code:#x} goes "
                                     f"straight to the guest (no exit)")
                raise

    def _perform(self, target: tuple[int, int], size: int, value: int | None):
        kind, addr = target
        if kind == 0:
            f = self._host_frames.get(addr >> 12)
            off = addr & 0xFFF
            if value is None:
                return 0 if f is None else int.from_bytes(f[0][off:off + size], "little")
            if f is None:
                f = self.host.frame_w(addr >> 12)
            f[0][off:off + size] = value.to_bytes(size, "little")
            return None
        if value is None:
            return self.gmem.read_uint(addr, size)
        if self.native:
            self.gmem.write_uint(addr, value, size)
        else:
            self.vm.mmu.emulated_write(self, addr, value, size)
        return None

    def _deliver(self, pf: PageFault) -> None:
        """Run the guest's #PF handler at CPL0 (with CR2 set), then return to the
        interrupted privilege level."""
        self.stats["guest_page_faults"] += 1
        if self.fault_handler is None:
            raise pf
        if self.fault_depth >= MAX_NESTED_FAULTS:
            raise GuestCrash(f"{MAX_NESTED_FAULTS} nested page faults (the last: {pf}): triple fault")
        self.cr2 = pf.address
        saved = self.guest.cpl
        self.fault_depth += 1
        self.set_cpl(0)
        try:
            self.fault_handler(self, pf.address, pf.error_code)
        finally:
            self.fault_depth -= 1
            self.set_cpl(saved)

    # --------------------------------------------------- privileged operations
    def set_fault_handler(self, handler) -> None:
        """handler(vcpu, address, error_code): the guest's #PF entry point."""
        self.fault_handler = handler

    def set_cpl(self, cpl: int) -> None:
        if cpl not in (0, 3):
            raise ValueError(f"CPL must be 0 or 3, got {cpl}")
        self.guest.cpl = cpl
        self.hw.cpl = cpl
        self._sync_access()

    def set_ac(self, ac: bool) -> None:
        """RFLAGS.AC (STAC/CLAC)."""
        self.guest.ac = self.hw.ac = bool(ac)
        self._sync_access()

    def write_pkru(self, value: int) -> None:
        """WRPKRU: no exit, the hardware uses the guest's PKRU directly."""
        if not 0 <= value < 1 << 32:
            raise ValueError(f"PKRU is 32 bits, got {value:#x}")
        self.guest.pkru = self.hw.pkru = value

    def _cr_exit(self, what: str) -> None:
        if not self.native:
            self.events.exit("cr_access", what)

    def write_cr0(self, value: int) -> None:
        old, pdptes = self.guest.cr0, self.guest.pdptes
        self._cr_exit(f"CR0 <- {value:#x}")
        self.guest.write_cr0(value, self.gmem)
        self._after_mode_write(old ^ value, 0, 0, pdptes)

    def write_cr4(self, value: int) -> None:
        old, pdptes = self.guest.cr4, self.guest.pdptes
        self._cr_exit(f"CR4 <- {value:#x}")
        self.guest.write_cr4(value, self.gmem)
        self._after_mode_write(0, old ^ value, 0, pdptes)

    def write_efer(self, value: int) -> None:
        old = self.guest.efer
        self._cr_exit(f"EFER <- {value:#x}")
        self.guest.write_efer(value, self.gmem)
        self._after_mode_write(0, 0, old ^ self.guest.efer, self.guest.pdptes)

    def write_cr3(self, value: int) -> None:
        if self.tdp:
            # no CR3-load exiting under EPT: the hardware loads the guest's CR3 itself
            # (PAE: its PDPTEs, through the EPT) and treats the combined TLB as native
            self.guest.write_cr3(value, self.gmem)
            if self.guest.mode is PagingMode.PAE:
                self.vm.mmu.load_pdptes(self)
            self.tlb.on_cr3_write(self.guest)
            return
        self._cr_exit(f"CR3 <- {value:#x}")
        self.guest.write_cr3(value, self.gmem)
        if self.native:
            self.tlb.on_cr3_write(self.guest)
        else:
            self.vm.mmu.reload_roots(self)

    def _after_mode_write(self, d_cr0: int, d_cr4: int, d_efer: int, old_pdptes: tuple) -> None:
        flush_bits = CR4_PGE | CR4_PAE | CR4_PSE | CR4_SMEP | CR4_LA57
        if self.tdp:
            # the exit was counted (CR0/CR4 guest/host masks); the TLB as native, and
            # PDPTEs the write reloaded are read through the EPT
            if self.guest.mode is PagingMode.PAE and (d_cr0 & CpuState._CR0_PDPTE_BITS
                                                       or d_cr4 & CpuState._CR4_PDPTE_BITS):
                self.vm.mmu.load_pdptes(self)
            if d_cr0 & CR0_PG or d_cr4 & flush_bits or d_efer & EFER_LME:
                self.tlb.flush()
            return
        if self.native:
            if d_cr0 & CR0_PG or d_cr4 & flush_bits or d_efer & EFER_LME:
                self.tlb.flush()
            return
        mmu = self.vm.mmu
        role_bits = (d_cr0 & (CR0_PG | 0x10000) or d_cr4 & (CR4_PAE | CR4_LA57 | CR4_SMEP | CR4_SMAP | CR4_PKE
                                                          | CR4_PSE) or d_efer)
        if role_bits or self.guest.pdptes != old_pdptes:
            mmu.reload_roots(self)      # new role, or new PAE roots
        else:
            mmu.flush_guest_tlb(self)

    def flush_tlb(self) -> None:
        """Flush every TLB entry, global ones too (CR4.PGE toggled twice, as Linux's
        __flush_tlb_all does; without PGE a CR3 reload)."""
        cr4 = self.guest.cr4
        if cr4 & CR4_PGE:
            self.write_cr4(cr4 & ~CR4_PGE)
            self.write_cr4(cr4)
        else:
            self.write_cr3(self.guest.cr3)

    def invalidate_all(self) -> None:
        """INVPCID type 2 (all contexts, global entries too): flushes the TLB without
        touching a control register, so it reloads no PAE PDPTEs.  It exits only under
        +unsync (reason "invlpg", as KVM intercepts INVLPG and INVPCID alike then)."""
        if self.native or self.tdp:         # tdp: not intercepted under EPT, the combined TLB only
            self.tlb.flush()
            return
        if self.vm.mmu.unsync_enabled:
            self.events.exit("invlpg", "INVPCID (all contexts)")
        self.vm.mmu.flush_guest_tlb(self)

    def invlpg(self, vaddr: int) -> None:
        """INVLPG: in 2007 not intercepted (write protection keeps sptes in sync); an
        exit under +unsync, whose shadow may be out of sync."""
        if self.native:
            self.tlb.invlpg(vaddr)
            return
        if self.tdp:
            self.tlb.invlpg(vaddr)          # not intercepted under EPT: the combined TLB only
            return
        if self.vm.mmu.unsync_enabled:
            self.events.exit("invlpg", f"INVLPG {vaddr:#x}")
        self.vm.mmu.invlpg(self, vaddr)

    def setup_paging(self, *, cr0: int, cr3: int, cr4: int = 0, efer: int = 0) -> None:
        """Enter a paging mode in one go (a boot path): CR4, EFER, CR3, then CR0."""
        self.write_cr0(self.guest.cr0 & ~CR0_PG)
        self.write_cr4(cr4)
        self.write_efer(efer)
        self.write_cr3(cr3)
        self.write_cr0(cr0)


def _acc_name(access: int) -> str:
    kind = "fetch" if access & ACC_FETCH else "write" if access & ACC_WRITE else "read"
    return ("user " if access & ACC_USER else "") + kind


__all__ = ["VCpu", "GuestCrash"]
