"""A PC for multiboot kernels on the real vCPU: load the image as QEMU's
``-kernel`` does, wire the devices, run until the guest exits through
isa-debug-exit (or dies, hangs, or leaves the machine), and report.

One vCPU, no timers and no device interrupts: a guest that halts waiting for an
interrupt is stopped with a message saying so.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import unicorn as U
import unicorn.x86_const as X

from .devices import PcDevices
from .multiboot import load_multiboot
from .qemu_state import CS, DS, ES, FS, GS, HF_CS64, HF_LMA, OFF_GDT, OFF_IDT, OFF_LDT, OFF_TR, SS
from .real_cpu import UNTIL, RealVCpu
from .vm import VM

# flat 4 GB segments as the multiboot spec requires at entry (QEMU's option ROM)
FLAT_CODE32 = 0x00CF9B00
FLAT_DATA32 = 0x00CF9300
TSS32_BUSY = 0x00008B00


@dataclass
class BootResult:
    """What a run produced: what the guest printed, how it ended, what it cost."""
    mode: str                        # "native" or the MMU policy
    serial: bytes
    status: int | None               # isa-debug-exit's (value << 1) | 1, None if the guest never wrote it
    stop_reason: str
    exits: dict[str, int]
    deliveries: dict[int, int]
    memory_sha256: str
    seconds: float
    mmu_stats: dict = field(default_factory=dict)
    vcpu_stats: dict = field(default_factory=dict)   # e.g. bypassed_faults: #PFs the hardware gave the guest directly
    trace: list[str] = field(default_factory=list)
    instructions: int | None = None          # guest instructions, when counted
    exit_seconds: dict = field(default_factory=dict)
    faults: dict | None = None               # exits per fault (analysis.real_fault_meter), when metered

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())

    @property
    def ok(self) -> bool:
        return self.status == 1


TDP_UNSUPPORTED = ("the real vCPU runs native or shadow paging; two-dimensional paging (tdp) is modelled on the "
                   "model vCPU only (run, compare, bench mmu, selfcheck --lockstep)")


class Machine:
    """``image``: the kernel's bytes; ``cmdline``: the multiboot command line (QEMU
    passes the image path then -append's words).  ``native`` (or ``policy="native"``):
    the hardware walks the guest's own tables; else the shadow MMU with ``policy``."""

    def __init__(self, image: bytes, cmdline: str = "kernel", *, native: bool = False, policy: str = "update",
                 ram_mib: int = 64, seed_access_bug: bool = False, audit: bool | int | None = None,
                 module: bytes | None = None, trace: int = 0, serial_sink=None, pool_pages: int = 4096):
        if not native and policy == "tdp":
            raise ValueError(TDP_UNSUPPORTED)
        ram = ram_mib << 20
        self.boot = boot = load_multiboot(image, cmdline=cmdline, ram_size=ram, module=module)
        self.devices = PcDevices(ram, serial_sink=serial_sink)
        self.vm = vm = VM(ram, native=native, policy="native" if native else policy, memory="mmap", audit=audit,
                          seed_access_bug=seed_access_bug, pool_pages=pool_pages, nr_vcpus=0)
        for gpa, size, handler, name in self.devices.mmio:
            vm.add_mmio(gpa, size, handler, name)
        for seg in boot.segments:
            self._write_guest(seg.paddr, seg.data)        # the bss is already zero: fresh memory
        for paddr, data in boot.writes:
            self._write_guest(paddr, data)
        self.cpu = cpu = RealVCpu(vm, self.devices, trace_limit=trace)
        cpu.hook_sensitive([(v, p, self._read_guest(p, n)) for v, p, n in boot.code_ranges])
        self._enter(boot.entry, boot.eax, boot.info_addr)

    def _write_guest(self, gpa: int, data: bytes) -> None:
        host, gmem = self.vm.host, self.vm.gmem
        i = 0
        while i < len(data):
            n = min(len(data) - i, 4096 - ((gpa + i) & 0xFFF))
            pfn = gmem.gfn_to_pfn((gpa + i) >> 12)
            host.write((pfn << 12) | ((gpa + i) & 0xFFF), data[i:i + n])
            i += n

    def _read_guest(self, gpa: int, n: int) -> bytes:
        return self.vm.gmem.read(gpa, n)

    def _enter(self, entry: int, eax: int, ebx: int) -> None:
        """The multiboot entry state: 32-bit flat protected mode, paging off (the
        guest's view; the shadow MMU's hardware runs its identity map)."""
        cpu, uc = self.cpu, self.cpu.uc
        cpu._program_hw()
        st = cpu.st.load()
        for seg, flags in ((CS, FLAT_CODE32), (SS, FLAT_DATA32), (DS, FLAT_DATA32), (ES, FLAT_DATA32),
                           (FS, FLAT_DATA32), (GS, FLAT_DATA32)):
            st.set_segment(seg, 0x08 if seg == CS else 0x10, 0, 0xFFFFFFFF, flags)
        st.set_segment(OFF_GDT, 0, 0, 0, 0)
        st.set_segment(OFF_IDT, 0, 0, 0x3FF, 0)
        st.set_segment(OFF_LDT, 0, 0, 0xFFFF, 0x8200)
        st.set_segment(OFF_TR, 0, 0, 0xFFFF, TSS32_BUSY)
        st.hflags &= ~(HF_LMA | HF_CS64)
        st.recompute_segment_hflags()
        st.store()
        uc.reg_write(X.UC_X86_REG_RFLAGS, 0x2)
        uc.reg_write(X.UC_X86_REG_RAX, eax)
        uc.reg_write(X.UC_X86_REG_RBX, ebx)
        uc.reg_write(X.UC_X86_REG_RIP, entry)

    def run(self, timeout: float | None = None) -> BootResult:
        cpu, uc = self.cpu, self.cpu.uc
        timer = None
        if timeout:
            timer = threading.Timer(timeout, cpu._stop, (f"timeout: the guest ran {timeout:g} s without exiting "
                                                         f"(--timeout)",))
            timer.daemon = True
            timer.start()
        t0 = time.perf_counter()
        try:
            while cpu.stop_reason is None:
                rip = uc.reg_read(X.UC_X86_REG_RIP)
                try:
                    uc.emu_start(rip, UNTIL)
                except U.UcError as e:
                    if cpu.stop_reason is None:
                        cpu.stop_reason = (f"the CPU stopped: {e} at RIP {uc.reg_read(X.UC_X86_REG_RIP):#x}")
                    break
                if cpu.stop_reason is None:
                    cpu.stop_reason = self._why_returned()
        finally:
            if timer is not None:
                timer.cancel()
        seconds = time.perf_counter() - t0
        return self._result(seconds)

    def _why_returned(self) -> str:
        uc = self.cpu.uc
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        if rip == UNTIL:
            return f"the guest jumped to {UNTIL:#x}, the address the runner reserves"
        flags = uc.reg_read(X.UC_X86_REG_RFLAGS)
        return (f"the guest halted (HLT before RIP {rip:#x}, interrupts {'on' if flags & 0x200 else 'off'}); this "
                f"machine has no timers or device interrupts, so nothing would wake it")

    def _result(self, seconds: float) -> BootResult:
        vm, cpu = self.vm, self.cpu
        lo, hi, delta = vm.gmem.linear_range()
        ram = vm.host.buffer[(lo + delta) << 12:(hi + delta) << 12]
        return BootResult(mode=vm.policy, serial=bytes(self.devices.serial_output), status=self.devices.exit_status,
                          stop_reason=cpu.stop_reason or "", exits=dict(vm.exits), deliveries=dict(cpu.deliveries),
                          memory_sha256=hashlib.sha256(ram).hexdigest(), seconds=seconds,
                          mmu_stats=dict(vm.mmu.stats) if vm.mmu else {}, vcpu_stats=dict(cpu.stats),
                          trace=list(cpu.trace),
                          instructions=cpu.instructions, exit_seconds=dict(cpu.exit_seconds))
