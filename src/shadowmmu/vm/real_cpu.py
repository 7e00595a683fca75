"""The real vCPU: unicorn (QEMU's TCG, Icelake-Server) executes the guest's x86
code, and the project's VM and shadow MMU handle every exit.

    unicorn runs guest code; its page walker walks the hardware CR3:
      native -> the guest's own tables;  shadow -> the MMU's shadow tables
    #PF  (UC_HOOK_INTR, vector 14)   native: deliver to the guest
                                     shadow: mmu.page_fault() -> PfResult
        FIXED      resume (the faulting instruction re-executes)
        INJECT     deliver the guest's #PF (its error code, its CR2)
        PTE_WRITE, EMULATE, MMIO
                   single-step the instruction (EFLAGS.TF) with the page mapped
                   to a scratch copy (RAM) or to the device window (MMIO), then
                   hand each of its writes to mmu.emulated_write (pte_write first)
    mov CRn / EFER / INVLPG (a code hook at each such instruction's address):
                   validated as KVM validates them, then the VCpu's own handlers
                   (which call the MMU), #GP(0) otherwise
    IN/OUT         the PC devices (vm.devices)
    other exceptions, INT n: delivered in software (vm.delivery)

The same memory is seen by both: guest RAM and the shadow page pool live in one
anonymous mapping (``x86.memory.MappedPhysicalMemory``) which unicorn maps
zero-copy with ``mem_map_ptr``: an spte the MMU writes from Python is what
QEMU's walker reads next.  Facts this rests on: REFERENCE.md §5-6.
"""

from __future__ import annotations

import time
from collections import Counter

import unicorn as U
import unicorn.x86_const as X

from ..mmu.mmu import MMUError, PfResult
from ..mmu.roots import pf_exits
from ..x86.bits import ACC_IMPLICIT, ACC_WRITE, EFER_LMA, PF_ID, PF_RSVD, PF_U, PF_W, PTE_A, PTE_D, PTE_P, PTE_U, PTE_W
from ..x86.faults import PageFault
from ..x86.tlb import Tlb
from ..x86.walker import translate
from . import delivery
from .intercepts import Intercepts
from .qemu_state import CS, DS, ES, FS, GS, HF_CS64, HF_LMA, HF_PE, OFF_GDT, OFF_IDT, OFF_LDT, OFF_TR, SS, HiddenState, check_layout
from .store_decoder import UnsupportedInstruction, decode, planned_writes
from .vcpu import VCpu

MSR_EFER = 0xC0000080
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE = 0xC0000100, 0xC0000101, 0xC0000102
UNTIL = 0x1                    # emu_start's end address: never guest code (see REFERENCE §6, run loop)
# scratch pages for emulated stores and the MMIO window: host-physical, above the
# host memory, below MAXPHYADDR 40 (the sptes that point there must be valid)
WINDOW_BASE = 0xFF_0000_0000
MMIO_WINDOW = WINDOW_BASE + 0x10000
NR_WINDOWS = 2
EFLAGS_TF, EFLAGS_AC = 1 << 8, 1 << 18
# guest bits of CR0/CR4/EFER that do not concern paging: passed to the hardware as the guest set them
CR0_PASSTHROUGH = 0x6004002E   # MP, EM, TS, ET, NE, AM, NW, CD
CR4_PASSTHROUGH = 0x00050E0F   # VME, PVI, TSD, DE, OSFXSR, OSXMMEXCPT, UMIP, FSGSBASE, OSXSAVE
EFER_SCE = 1

_SEG_TABLES = {"es": ES, "cs": CS, "ss": SS, "ds": DS, "fs": FS, "gs": GS, "ldt": OFF_LDT, "tr": OFF_TR,
               "gdt": OFF_GDT, "idt": OFF_IDT}
_REGS = {"rip": X.UC_X86_REG_RIP, "rsp": X.UC_X86_REG_RSP, "rflags": X.UC_X86_REG_RFLAGS}


class MachineStop(Exception):
    """The run ends: ``reason`` says why in one line."""


class HwTlb(Tlb):
    """The VCpu's TLB interface over QEMU's TLB: the MMU flushes "the hardware TLB"
    through it; the flush reaches QEMU when the vCPU resumes the guest."""

    def __init__(self):
        super().__init__()
        self.flush_pending = True

    def flush(self) -> None:
        self.flush_pending = True

    def invlpg(self, vaddr: int) -> None:
        # only from the guest's own INVLPG, which QEMU then executes itself
        pass

    def on_cr3_write(self, cpu) -> None:
        self.flush_pending = True


class RealVCpu(Intercepts, VCpu):
    """A VCpu whose instructions unicorn executes.  Build it through ``Machine``."""

    tlb_class = HwTlb

    def __init__(self, vm, devices, *, trace_limit: int = 0):
        super().__init__(vm, len(vm.vcpus))
        vm.vcpus.append(self)
        self.devices = devices
        self.deliveries: Counter = Counter()     # events delivered in software, by vector
        self.io_counts: Counter = Counter()
        self.trace_limit = trace_limit
        self.trace: list[str] = []
        self.stop_reason: str | None = None
        self.stopping = False
        self.guest_cr2 = 0
        self.stepping = None        # an emulation in progress (see _begin_emulation)
        self._xlat: dict[int, int] = {}
        self.observer = None        # e.g. analysis.real_fault_meter: before_pf_exit(), deliver()
        self.exit_seconds: Counter = Counter()     # Python time spent in #PF exits, by reason
        self.instructions = None    # counted only on request (count_instructions): a hook per instruction
        check_layout()
        self.uc = uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
        uc.ctl_set_cpu_model(X.UC_CPU_X86_ICELAKE_SERVER)
        self.st = HiddenState(uc)
        self._programmed = None
        self._map_memory()
        uc.hook_add(U.UC_HOOK_INTR, self._on_intr)
        uc.hook_add(U.UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(U.UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(U.UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(U.UC_HOOK_MEM_UNMAPPED, self._on_unmapped)

    # ------------------------------------------------------------------ memory
    def _map_memory(self) -> None:
        uc, host = self.uc, self.vm.host
        if not hasattr(host, "host_address"):
            raise ValueError("the real vCPU needs the mmap memory backend (VM(memory='mmap'))")
        host.share()            # unicorn writes guest RAM (and the guest's A/D bits) behind Python's back
        base = host.host_address()
        if self.native:
            # the hardware addresses guest-physical memory directly: map guest RAM at 0
            lo, hi, delta = self.gmem.linear_range()
            uc.mem_map_ptr(lo << 12, (hi - lo) << 12, U.UC_PROT_ALL, base + ((lo + delta) << 12))
            for r in self.gmem.mmio:
                self._map_device(r.gpa, r.size, r.gpa)
        else:
            size = host.size
            uc.mem_map_ptr(0, size, U.UC_PROT_ALL, base)
            uc.mem_map(WINDOW_BASE, NR_WINDOWS << 12, U.UC_PROT_ALL)
            self._mmio_gpa = 0
            uc.mmio_map(MMIO_WINDOW, 0x1000, self._window_read, None, self._window_write, None)

    def _map_device(self, gpa: int, size: int, at: int) -> None:
        def read(uc, offset, sz, _):
            return self.gmem.read_uint(at + offset, sz)

        def write(uc, offset, sz, value, _):
            self.gmem.write_uint(at + offset, value, sz)
        self.uc.mmio_map(gpa, size, read, None, write, None)

    def _window_read(self, uc, offset, size, _):
        return self._device_access(self._mmio_gpa | offset, size, None)

    def _window_write(self, uc, offset, size, value, _):
        self._device_access(self._mmio_gpa | offset, size, value)

    def _device_access(self, gpa: int, size: int, value: int | None) -> int:
        if self.gmem.mmio_region(gpa) is None:
            self._stop(f"the guest accessed physical address {gpa:#x}, where there is neither RAM nor a device")
            return 0
        if value is None:
            return self.gmem.read_uint(gpa, size)
        self.gmem.write_uint(gpa, value, size)
        return 0

    def _on_unmapped(self, uc, access, address, size, value, _):
        kind = {U.UC_MEM_READ_UNMAPPED: "read", U.UC_MEM_WRITE_UNMAPPED: "write",
                U.UC_MEM_FETCH_UNMAPPED: "fetch"}.get(access, "access")
        if self.stopping:
            return False
        self._stop(f"the guest's {kind} of {size} bytes at physical address {address:#x} reached neither RAM "
                   f"nor a device (RIP {self.reg('rip'):#x})")
        return False

    # ---------------------------------------------------------------- registers
    def reg(self, name: str) -> int:
        return self.uc.reg_read(_REGS[name])

    def cpl(self) -> int:
        return self.st.load().cpl

    @property
    def long_mode(self) -> bool:
        return bool(self.guest.efer & EFER_LMA)

    def segment(self, which: str) -> tuple[int, int, int, int]:
        return self.st.load().segment(_SEG_TABLES[which])

    def set_cr2(self, value: int) -> None:
        self.guest_cr2 = value
        self.uc.reg_write(X.UC_X86_REG_CR2, value)

    def enter_handler(self, *, cs, ss, rsp, rip, rflags) -> None:
        st = self.st.load()
        st.set_segment(CS, *cs)
        if ss is not None:
            st.set_segment(SS, *ss)
        st.recompute_segment_hflags()
        st.store()
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_RSP, rsp)
        uc.reg_write(X.UC_X86_REG_RFLAGS, rflags)
        uc.reg_write(X.UC_X86_REG_RIP, rip)

    def _sync_guest_flags(self, st=None, cpl: int | None = None, eflags: int | None = None) -> None:
        """CPL, EFLAGS.AC and PKRU, which decide a walk's outcome, into the guest state
        (from a context loaded just now, or loaded here)."""
        g = self.guest
        if cpl is None:
            st = self.st.load()
            cpl, eflags = st.cpl, st.eflags
        g.cpl = cpl
        g.ac = bool(eflags & EFLAGS_AC)
        if g.pk_active:
            g.pkru = st.pkru
        self.hw.cpl, self.hw.ac, self.hw.pkru = g.cpl, g.ac, g.pkru

    # ------------------------------------------------- guest linear memory (delivery)
    def _linear_to_gpa(self, vaddr: int, write: bool) -> int:
        """A supervisor implicit access's guest-physical address (raises PageFault).
        The pages one event delivery touches (IDT, GDT, TSS, stack) are walked once:
        ``_xlat`` lives for one delivery or one decoded instruction."""
        key = (vaddr >> 12) << 1 | write
        gpa = self._xlat.get(key)
        if gpa is None:
            g = self.guest
            saved = g.cpl
            g.cpl = 0
            try:
                gpa = translate(self.gmem, g, vaddr & ~0xFFF, ACC_IMPLICIT | (ACC_WRITE if write else 0),
                                record=False).paddr
            finally:
                g.cpl = saved
            self._xlat[key] = gpa
        return gpa | (vaddr & 0xFFF)

    def read_linear(self, vaddr: int, size: int) -> int:
        first = 4096 - (vaddr & 0xFFF)
        if first < size:            # a descriptor or a pointer may straddle a page
            return self.read_linear(vaddr, first) | (self.read_linear(vaddr + first, size - first) << (8 * first))
        return int.from_bytes(self.gmem.read(self._linear_to_gpa(vaddr, False), size), "little")

    def read_code(self, vaddr: int, n: int = 15) -> bytes:
        """Up to ``n`` instruction bytes at vaddr, stopping at a page the guest cannot fetch."""
        first = min(n, 4096 - (vaddr & 0xFFF))
        code = self.gmem.read(self._linear_to_gpa(vaddr, False), first)
        if first < n:
            try:
                code += self.gmem.read(self._linear_to_gpa(vaddr + first, False), n - first)
            except PageFault:
                pass
        return code

    def write_linear(self, vaddr: int, value: int, size: int) -> None:
        first = 4096 - (vaddr & 0xFFF)
        if first < size:                       # translate both pages before writing either
            gpa1 = self._linear_to_gpa(vaddr, True)
            gpa2 = self._linear_to_gpa(vaddr + first, True)
            self._write_gpa(gpa1, value & ((1 << (8 * first)) - 1), first)
            self._write_gpa(gpa2, value >> (8 * first), size - first)
        else:
            self._write_gpa(self._linear_to_gpa(vaddr, True), value, size)

    def _write_gpa(self, gpa: int, value: int, size: int) -> None:
        if self.native:
            self.gmem.write_uint(gpa, value, size)
        else:
            self.vm.mmu.emulated_write(self, gpa, value, size)

    # ----------------------------------------------------------- hardware state
    def _program_hw(self) -> None:
        """Load the hardware registers: the guest's own (native) or the MMU's
        (shadow: the shadow root, PAE or long mode, CR0.WP=1) plus the guest's
        non-paging bits; flush QEMU's TLB if the MMU asked for it."""
        g = self.guest
        if self.native:
            want = (g.cr0, g.cr3, g.cr4, g.efer)
        else:
            hw = self.hw
            want = (hw.cr0 | (g.cr0 & CR0_PASSTHROUGH), hw.cr3, hw.cr4 | (g.cr4 & CR4_PASSTHROUGH),
                    hw.efer | (g.efer & EFER_SCE))
        uc = self.uc
        if want != self._programmed:
            cr0, cr3, cr4, efer = want
            uc.reg_write(X.UC_X86_REG_CR4, cr4)
            uc.msr_write(MSR_EFER, efer)
            uc.reg_write(X.UC_X86_REG_CR3, cr3)
            uc.reg_write(X.UC_X86_REG_CR0, cr0)
            if uc.msr_read(MSR_EFER) != efer:
                # WRMSR cannot change EFER.LMA (it is the CPU's), and unicorn's 64-bit
                # mode starts with it set: put EFER and hflags.LMA right in the context
                st = self.st.load()
                st.efer = efer
                st.hflags = st.hflags & ~(HF_LMA | HF_CS64) | (HF_LMA if efer & EFER_LMA else 0)
                st.recompute_segment_hflags()
                st.store()
            self._programmed = want
            self.tlb.flush_pending = True
        if self.tlb.flush_pending:
            uc.ctl(U.UC_CTL_TLB_FLUSH, U.UC_CTL_IO_WRITE)
            self.tlb.flush_pending = False

    # ------------------------------------------------------------------- events
    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stopping = True
        self.uc.emu_stop()

    def _note(self, text: str) -> None:
        if len(self.trace) < self.trace_limit:
            self.trace.append(text)

    def _on_intr(self, uc, intno, _):
        # one load and one store of the context per event: the hook's inputs come from it,
        # and a hidden #PF's CR2 write is undone in it (the guest's CR2 is restored; an
        # injected #PF sets the guest's new CR2 afterwards)
        st = self.st.load()
        software = st.exception_is_int
        error_code = st.error_code
        fault_address = st.cr2
        cpl, eflags = st.cpl, st.eflags
        st.clear_old_exception()
        if intno == 14 and not self.native:
            st.cr2 = self.guest_cr2
        st.store()
        if self.stopping:
            return
        try:
            if intno == 1 and self.stepping is not None and not software:
                t0 = time.perf_counter()
                reason = self.stepping.windows[0][6].exit_reason
                self._finish_emulation()
                self.exit_seconds[reason] += time.perf_counter() - t0
            elif intno == 14:
                t0 = time.perf_counter()
                reason = self._on_page_fault(fault_address, error_code, cpl, eflags)
                if reason is not None:
                    self.exit_seconds[reason] += time.perf_counter() - t0
            else:
                if self.stepping is not None:
                    self._abort_emulation()
                self._deliver(intno, error_code if intno in delivery.HAS_ERROR_CODE and not software else None,
                              software=software)
        except MachineStop as e:
            self._stop(str(e))
        except delivery.TripleFault as e:
            self._stop(str(e))
        except (MMUError, UnsupportedInstruction) as e:
            self._stop(f"{type(e).__name__}: {e}")
        except Exception as e:       # e.g. an AuditError: stop with the reason, never inside unicorn
            self._stop(f"{type(e).__name__} at RIP {self.reg('rip'):#x}: {e}")

    def _deliver(self, vector: int, error_code: int | None, *, software: bool = False, cr2: int | None = None):
        self.deliveries[vector] += 1
        self._xlat.clear()
        if self.observer is not None:
            self.observer.deliver(vector, error_code, cr2, self.st.load().cpl)
        if self.trace_limit:
            name = delivery.VECTOR_NAMES.get(vector, f"INT {vector:#x}")
            self._note(f"deliver {name}" + (f" error code {error_code:#x}" if error_code is not None else "")
                       + (f" CR2 {cr2:#x}" if cr2 is not None else "") + f" at RIP {self.reg('rip'):#x}")
        delivery.deliver(self, vector, error_code, software=software, cr2=cr2)

    def _on_invalid(self, uc, _):
        if self.stopping:
            return False
        try:
            self._deliver(delivery.UD, None)
        except delivery.TripleFault as e:
            self._stop(str(e))
        return True

    def _on_page_fault(self, vaddr: int, error_code: int, cpl: int, eflags: int) -> str | None:
        """A #PF raised by the hardware walk; returns the exit's reason (None natively)."""
        if self.native:
            self._deliver(delivery.PF, error_code, cr2=vaddr)
            return None
        if self.pfec_filter is not None:
            if not pf_exits(self.pfec_filter, error_code):       # bypass: the VMCS's #PF filter
                self.stats["bypassed_faults"] += 1
                self._deliver(delivery.PF, error_code, cr2=vaddr)
                return None
        elif error_code & PF_RSVD:
            raise MMUError(f"the hardware found reserved bits in an spte walking {vaddr:#x}")
        if self.stepping is not None and vaddr >> 12 in self.stepping.windows_by_page:
            raise MMUError(f"the emulation window of {vaddr:#x} faults")
        self._sync_guest_flags(self.st, cpl, eflags)
        if self.observer is not None:
            self.observer.before_pf_exit(vaddr, cpl)
        access = error_code & (PF_W | PF_U | PF_ID)
        events = self.events
        result = self.vm.mmu.page_fault(self, vaddr, access)
        events.exits[result.exit_reason] += 1
        if self.trace_limit:
            self._note(f"VM exit ({result.exit_reason}): #PF at {vaddr:#x} error code {error_code:#x} "
                       f"RIP {self.reg('rip'):#x}")
        if result is PfResult.FIXED:
            self._program_hw()
        elif result is PfResult.INJECT:
            self._program_hw()
            if self.stepping is not None:
                self._abort_emulation()
            pf = self.mmu_state.fault
            self._deliver(delivery.PF, pf.error_code, cr2=pf.address)
        else:
            self._begin_emulation(vaddr, access, result)
        return result.exit_reason

    # -------------------------------------------------------- emulated accesses
    def _leaf_spte_address(self, vaddr: int) -> int:
        """Host-physical address of the shadow leaf entry the hardware uses for vaddr."""
        hw = self.hw
        try:
            t = translate(self.host, hw, vaddr, 0, set_ad=False)
            entries = t.entries
        except PageFault as pf:
            entries = pf.entries
        if not entries or entries[-1][0] != 1:
            raise MMUError(f"no shadow leaf for {vaddr:#x} after the MMU asked to emulate an access to it")
        return entries[-1][1]

    def _begin_emulation(self, vaddr: int, access: int, result: PfResult) -> None:
        """Map vaddr's page for one instruction -- a scratch copy of the frame, or the
        MMIO window -- and single-step it.  Which bytes it writes is decoded now,
        from the registers before it runs (the emulator's job in KVM)."""
        gpa = self.mmu_state.gpa
        step = self.stepping
        if step is None:
            step = self.stepping = _Emulation(self)
        if len(step.windows) >= NR_WINDOWS:
            raise MMUError(f"an instruction at RIP {self.reg('rip'):#x} needs more than {NR_WINDOWS} emulated pages")
        spte_addr = self._leaf_spte_address(vaddr)
        original = self.host.read_u64(spte_addr)
        if result is PfResult.MMIO:
            if step.mmio_page is not None:
                raise MMUError("an instruction touches two MMIO pages")
            window = MMIO_WINDOW
            step.mmio_page = vaddr >> 12
            self._mmio_gpa = gpa & ~0xFFF
            if self.gmem.mmio_region(gpa) is None:
                raise MachineStop(f"the guest accessed physical address {gpa:#x}, where there is neither RAM nor a "
                                  f"device (RIP {self.reg('rip'):#x})")
        else:
            window = WINDOW_BASE + (len(step.windows) << 12)
            self.uc.mem_write(window, self.gmem.read(gpa & ~0xFFF, 4096))
        # the access the guest walk allowed, for one instruction: user if it was a user access
        spte = window | PTE_P | PTE_W | PTE_A | PTE_D | (PTE_U if access & PF_U else 0)
        self.host.qwords_w(spte_addr >> 12)[(spte_addr & 0xFFF) >> 3] = spte
        step.windows.append((vaddr >> 12, spte_addr, original, spte, gpa & ~0xFFF, window, result))
        step.windows_by_page[vaddr >> 12] = window
        self.tlb.flush_pending = True
        self._program_hw()
        if step.writes is None:
            step.plan()

    def _restore_windows(self, step) -> None:
        q = self.host.qwords_w
        for _, spte_addr, original, spte, *_ in step.windows:
            qw = q(spte_addr >> 12)
            i = (spte_addr & 0xFFF) >> 3
            if qw[i] == spte:        # the MMU did not change it meanwhile
                qw[i] = original
        self.tlb.flush_pending = True
        self._program_hw()
        self.uc.reg_write(X.UC_X86_REG_RFLAGS, self.uc.reg_read(X.UC_X86_REG_RFLAGS) & ~EFLAGS_TF | step.tf)
        self.uc.reg_write(X.UC_X86_REG_DR6, step.dr6)
        self.stepping = None

    def _abort_emulation(self) -> None:
        self._restore_windows(self.stepping)

    def _finish_emulation(self) -> None:
        step = self.stepping
        self._restore_windows(step)
        kinds = {w[0]: w for w in step.windows}
        mmu = self.vm.mmu
        for lin, size in step.writes:
            while size:
                part = min(size, 4096 - (lin & 0xFFF))
                w = kinds.get(lin >> 12)
                if w is not None and w[6] is not PfResult.MMIO:
                    off = lin & 0xFFF
                    value = int.from_bytes(self.uc.mem_read(w[5] + off, part), "little")
                    mmu.emulated_write(self, w[4] | off, value, part)
                    if self.trace_limit:
                        self._note(f"  emulated write of {part} bytes {value:#x} at gpa {w[4] | off:#x}")
                lin += part
                size -= part
        self._program_hw()

    def count_instructions(self) -> None:
        """Count every guest instruction from now on (``instructions``): a code hook
        on every instruction, which makes the guest run an order of magnitude slower."""
        self.instructions = 0

        def count(uc, address, size, _):
            self.instructions += 1
        self.uc.hook_add(U.UC_HOOK_CODE, count)

    # --------------------------------------------------------------- port I/O
    # QEMU's isa-debug-exit ends the process at once; unicorn stops at the end of the
    # translation block, so the few instructions left in it run: their port
    # accesses are dropped (a kernel's exit path is an OUT then HLT or a loop).
    def _io_denied(self, port: int, size: int) -> bool:
        """SDM 19.5: in protected mode with CPL > IOPL, the TSS's I/O permission bitmap
        decides; a port it does not allow is #GP(0).  Unicorn calls the port hooks
        without QEMU's check, so the check is made here (and the #GP delivered)."""
        st = self.st.load()
        if not st.hflags & HF_PE or st.cpl <= (st.eflags >> 12) & 3:
            return False
        _, base, limit, flags = st.segment(OFF_TR)
        allowed = False
        if (flags >> 8) & 0xF in (9, 11) and limit >= 103:
            try:
                io_base = self.read_linear(base + 0x66, 2)
                at = io_base + (port >> 3)
                if at + 1 <= limit:
                    bits = self.read_linear(base + at, 2) >> (port & 7)
                    allowed = not bits & ((1 << size) - 1)
            except PageFault:
                allowed = False
        if not allowed:
            # The architecture says #GP(0) here.  Unicorn 2.1.4 runs port hooks without
            # QEMU's I/O permission check and a hook cannot abort its instruction (the rest
            # of the translation block would run in the handler's context), so the
            # machine stops instead of going on with a wrong answer; the device never sees
            # the access.
            self._stop(f"the guest's access to port {port:#x} at CPL {st.cpl} "
                       f"(IOPL {(st.eflags >> 12) & 3}) needs #GP(0), which unicorn's port hooks cannot "
                       f"raise: stopped (RIP {self.reg('rip'):#x})")
        return not allowed

    def _on_in(self, uc, port, size, _):
        if self.stopping:
            return 0xFFFFFFFF
        if self._io_denied(port, size):
            return 0
        if not self.native:
            self.events.exits["io"] += 1
        self.io_counts[port] += 1
        return self.devices.ports.read(port, size)

    def _on_out(self, uc, port, size, value, _):
        if self.stopping:
            return
        if self._io_denied(port, size):
            return
        if not self.native:
            self.events.exits["io"] += 1
        self.io_counts[port] += 1
        self.devices.ports.write(port, size, value)
        if self.devices.exited:
            self._stop(f"the guest wrote {self.devices.debug_exit.value:#x} to isa-debug-exit")


class _Emulation:
    """One instruction being single-stepped over emulation windows."""

    __slots__ = ("cpu", "windows", "windows_by_page", "writes", "tf", "dr6", "mmio_page")

    def __init__(self, cpu: RealVCpu):
        self.cpu = cpu
        self.windows: list = []
        self.windows_by_page: dict[int, int] = {}
        self.writes: list[tuple[int, int]] | None = None
        self.mmio_page = None
        uc = cpu.uc
        flags = uc.reg_read(X.UC_X86_REG_RFLAGS)
        self.tf = flags & EFLAGS_TF
        self.dr6 = uc.reg_read(X.UC_X86_REG_DR6)
        uc.reg_write(X.UC_X86_REG_RFLAGS, flags | EFLAGS_TF)

    def plan(self) -> None:
        cpu = self.cpu
        cpu._xlat.clear()
        rip = cpu.reg("rip")
        st = cpu.st.load()
        cs_base = st.segment(CS)[1]
        bitness = 64 if st.hflags & (1 << 15) else 32 if st.hflags & (1 << 4) else 16
        code = cpu.read_code(cs_base + rip)
        insn = decode(code, bitness, rip)

        def seg_base(i):
            if bitness == 64 and i not in (FS, GS):
                return 0
            return st.segment(i)[1]
        self.writes = planned_writes(insn, cpu.uc.reg_read, seg_base)
