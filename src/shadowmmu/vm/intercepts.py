"""Sensitive instructions of the real vCPU: found by address, validated as KVM
validates them, emulated on the guest state the MMU uses.

Unicorn cannot hook ``mov`` to/from CRn, ``invlpg`` or ``wrmsr``/``rdmsr`` by
kind; a UC_HOOK_CODE whose range is one address costs nothing elsewhere
(REFERENCE.md §6), so the loader scans every loaded segment for the opcode bytes
(0F 20/22 mov CR, 0F 01 /7 invlpg, 0F 30 wrmsr, 0F 32 rdmsr), with the prefixes
that may come before them, and hooks each candidate address.  A candidate that is
really data never starts an instruction, so its hook never fires.  In the hook,
the instruction is decoded from guest memory (what runs, not what was scanned).

QEMU 5.0 checks almost nothing on these writes (REFERENCE.md §6); the checks
here are KVM's ``kvm_set_cr0/cr3/cr4`` and ``kvm_valid_efer`` for the CPU model
the guest sees (Icelake-Server: no PCID, no VMX/SMX for the guest), and a
failed check is #GP(0) in the guest.
"""

from __future__ import annotations

import iced_x86 as iced
import unicorn.x86_const as X

from ..x86.bits import CR0_PE, CR0_PG, CR4_LA57, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE
from ..x86.faults import GeneralProtection
from . import delivery
from .qemu_state import CS, HF_CS32, HF_CS64
from .store_decoder import _GPR, decode, operand_address

MSR_EFER = 0xC0000080
CANONICAL_MSRS = {0xC0000100: "FS.base", 0xC0000101: "GS.base", 0xC0000102: "KERNEL_GS_BASE"}
CR0_CD, CR0_NW = 1 << 30, 1 << 29
# CR4 bits the Icelake-Server model supports (no PCIDE, VMXE, SMXE for a guest)
CR4_SUPPORTED = sum(1 << b for b in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 18, 20, 21, 22))
EFER_SUPPORTED = 1 | EFER_LME | EFER_LMA | EFER_NXE          # SCE, LME, LMA, NXE
_CR = {getattr(iced.Register, f"CR{i}"): i for i in (0, 2, 3, 4, 8)}
_MOV_CR = {iced.Mnemonic.MOV}


def sensitive_sites(code: bytes) -> list[int]:
    """Offsets in ``code`` where a sensitive instruction may start: the opcode's
    0F byte and up to two prefix bytes before it (REX, operand/address size,
    segment overrides)."""
    sites = set()
    n = len(code)
    i = code.find(b"\x0f")
    while 0 <= i < n - 1:
        op = code[i + 1]
        hit = op in (0x20, 0x22, 0x30, 0x32)
        if op == 0x01 and i + 2 < n:
            modrm = code[i + 2]
            hit = (modrm >> 3) & 7 == 7 and modrm >> 6 != 3        # invlpg m
        if hit:
            sites.add(i)
            j = i
            for _ in range(2):
                if j > 0 and (0x40 <= code[j - 1] <= 0x4F or code[j - 1] in (0x66, 0x67, 0x26, 0x2E, 0x36, 0x3E,
                                                                              0x64, 0x65)):
                    j -= 1
                    sites.add(j)
                else:
                    break
        i = code.find(b"\x0f", i + 1)
    return sorted(sites)


def check_cr0(cpu, value: int) -> None:
    """kvm_set_cr0's checks beyond the architectural ones CpuState makes."""
    if value >> 32:
        raise GeneralProtection(f"CR0 {value:#x} sets reserved bits 63:32")
    if value & CR0_NW and not value & CR0_CD:
        raise GeneralProtection("CR0.NW=1 with CR0.CD=0")
    g = cpu.guest
    if value & CR0_PG and not g.cr0 & CR0_PG and g.efer & EFER_LME:
        if not g.cr4 & CR4_PAE:
            raise GeneralProtection("enabling long-mode paging without CR4.PAE")
        if cpu.segment("cs")[3] & (1 << 21):
            raise GeneralProtection("enabling long-mode paging with CS.L=1")
    if not value & CR0_PE and value & CR0_PG:
        raise GeneralProtection("CR0.PG=1 requires CR0.PE=1")


def check_cr4(cpu, value: int) -> None:
    if value & ~CR4_SUPPORTED:
        raise GeneralProtection(f"CR4 {value:#x} sets bits this CPU does not support ({value & ~CR4_SUPPORTED:#x})")
    g = cpu.guest
    if g.efer & EFER_LMA and not value & CR4_PAE:
        raise GeneralProtection("clearing CR4.PAE in long mode")
    if g.efer & EFER_LMA and (value ^ g.cr4) & CR4_LA57:
        raise GeneralProtection("CR4.LA57 cannot change while long mode is active")


def check_efer(cpu, value: int) -> None:
    if value & ~EFER_SUPPORTED:
        raise GeneralProtection(f"EFER {value:#x} sets reserved bits {value & ~EFER_SUPPORTED:#x}")


class Intercepts:
    """The sensitive-instruction share of RealVCpu."""

    def hook_sensitive(self, code_ranges) -> int:
        """Hook every candidate site of the loaded segments ((vaddr, paddr, bytes)):
        at its physical address (code run before paging) and at its virtual one."""
        import unicorn as U
        addrs = set()
        for vaddr, paddr, data in code_ranges:
            for off in sensitive_sites(data):
                addrs.add(paddr + off)
                addrs.add(vaddr + off)
        for a in sorted(addrs):
            self.uc.hook_add(U.UC_HOOK_CODE, self._on_sensitive, None, a, a)
        self.sensitive_sites = len(addrs)
        return len(addrs)

    def _on_sensitive(self, uc, address, size, _):
        if self.stopping:
            return
        st = self.st.load()
        if st.cpl:
            return          # CPL3: the CPU raises #GP itself (mov CR, invlpg, rdmsr/wrmsr are privileged)
        bitness = 64 if st.hflags & HF_CS64 else 32 if st.hflags & HF_CS32 else 16
        rip = address
        self._xlat.clear()
        code = self.read_code(st.segment(CS)[1] + rip)
        try:
            insn = decode(code, bitness, rip)
        except Exception:
            return
        m = insn.mnemonic
        try:
            if m == iced.Mnemonic.MOV and insn.op0_register in _CR:
                done = self._mov_to_cr(_CR[insn.op0_register], self._gpr(insn.op1_register, bitness))
            elif m == iced.Mnemonic.MOV and insn.op1_register in _CR:
                done = self._mov_from_cr(_CR[insn.op1_register], insn.op0_register)
            elif m == iced.Mnemonic.INVLPG:
                self._invlpg(insn, st, bitness)
                return      # QEMU executes it too: that is the hardware TLB's invalidation
            elif m == iced.Mnemonic.WRMSR:
                done = self._wrmsr()
            elif m == iced.Mnemonic.RDMSR:
                done = self._rdmsr()
            else:
                return
        except GeneralProtection as e:
            if self.trace_limit:
                self._note(f"#GP(0) for '{insn}' at {rip:#x}: {e}")
            self._program_hw()
            try:
                self._deliver(delivery.GP, 0)
            except delivery.TripleFault as t:
                self._stop(str(t))
            return
        except Exception as e:                      # an MMU invariant broke: stop, say where
            self._stop(f"{type(e).__name__} handling '{insn}' at {rip:#x}: {e}")
            return
        if done:
            self._program_hw()
            mask = 0xFFFFFFFF if bitness != 64 else (1 << 64) - 1
            uc.reg_write(X.UC_X86_REG_RIP, (rip + insn.len) & mask)

    def _gpr(self, reg: int, bitness: int) -> int:
        u, mask = _GPR[reg]
        return self.uc.reg_read(u) & (mask if bitness == 64 else 0xFFFFFFFF)

    def _mov_to_cr(self, n: int, value: int) -> bool:
        if n == 2:
            self.guest_cr2 = value
            return False                # QEMU writes the real CR2
        if n == 8:
            return False
        self._sync_guest_flags()
        if n == 0:
            check_cr0(self, value)
            self.write_cr0(value)
        elif n == 3:
            self.write_cr3(value)
        else:
            check_cr4(self, value)
            self.write_cr4(value)
        return True

    def _mov_from_cr(self, n: int, dest: int) -> bool:
        if n in (2, 8):
            return False
        g = self.guest
        value = {0: g.cr0, 3: g.cr3, 4: g.cr4}[n]
        if n == 3 and not self.native:
            self.events.exits["cr_access"] += 1
        u, _ = _GPR[dest]
        self.uc.reg_write(u, value)
        return True

    def _invlpg(self, insn, st, bitness) -> None:
        def seg_base(i):
            return 0 if bitness == 64 and i < 4 else st.segment(i)[1]
        self.invlpg(operand_address(insn, self.uc.reg_read, seg_base, bitness))

    def _wrmsr(self) -> bool:
        uc = self.uc
        ecx = uc.reg_read(X.UC_X86_REG_ECX)
        value = (uc.reg_read(X.UC_X86_REG_EDX) << 32) | uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF
        if ecx == MSR_EFER:
            check_efer(self, value)
            # LMA is the CPU's: a write keeps the current value (kvm_set_efer)
            self.write_efer((value & ~EFER_LMA) | (self.guest.efer & EFER_LMA))
            return True
        if ecx in CANONICAL_MSRS and not -(1 << 47) <= _signed(value) < 1 << 47:
            raise GeneralProtection(f"{CANONICAL_MSRS[ecx]} {value:#x} is not canonical")
        return False

    def _rdmsr(self) -> bool:
        uc = self.uc
        if uc.reg_read(X.UC_X86_REG_ECX) != MSR_EFER:
            return False
        if not self.native:
            self.events.exits["msr"] += 1
        value = self.guest.efer
        uc.reg_write(X.UC_X86_REG_RAX, value & 0xFFFFFFFF)
        uc.reg_write(X.UC_X86_REG_RDX, value >> 32)
        return True


def _signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v
