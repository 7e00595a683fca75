"""A minimal guest: the smallest thing that demand-pages, for MMU tests and benches.

It builds its page tables with guest stores (paging off, so gva == gpa),
identity-maps its low memory for the kernel, and has a demand fault handler that
installs a pte -- A set, D on a write, as Linux does.  The Linux-like kernel of
``shadowmmu.guest`` is the real guest; this one isolates the MMU's behaviour."""

from shadowmmu.x86.builder import control_registers
from shadowmmu.x86.formats import PagingMode

# the formats this guest builds tables for
MODES = (PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4)
P, W, U, A, D = 1, 2, 4, 0x20, 0x40
KERNEL_FRAMES = 0x400          # identity-mapped (gva == gpa), supervisor, for tables and data
USER_BASE = 0x40000000


class MiniGuest:
    def __init__(self, vm, guest: str, kernel_frames: int = KERNEL_FRAMES):
        self.vm = vm
        self.v = vm.vcpu
        self.mode = PagingMode.parse(guest)
        if self.mode not in MODES:
            raise ValueError(f"the minimal guest runs {', '.join(m.short for m in MODES)} paging, not {guest!r}")
        self.wide = self.mode is not PagingMode.BITS32
        self.esz = 8 if self.wide else 4
        self.next_frame = 0x100
        self.kernel_frames = kernel_frames
        self.root = self.alloc()
        self.handled = []
        for gfn in range(kernel_frames):
            self.v.store(self.pte_addr(gfn << 12), (gfn << 12) | P | W | A | D, self.esz)
        self.v.setup_paging(**control_registers(self.mode, self.root << 12, nxe=self.wide))
        self.v.set_fault_handler(self.on_fault)

    def alloc(self) -> int:
        gfn = self.next_frame
        if gfn >= self.kernel_frames:
            raise MemoryError(f"minimal guest: out of identity-mapped frames ({self.kernel_frames})")
        self.next_frame += 1
        return gfn

    def pte_addr(self, va: int) -> int:
        """Address of the pte for va, creating tables on the way (kernel stores)."""
        v = self.v
        bits = 9 if self.wide else 10
        if self.mode is PagingMode.PAE:
            pdpte_addr = (self.root << 12) + 8 * ((va >> 30) & 3)
            e = v.load(pdpte_addr, 8)
            if not e & P:
                e = (self.alloc() << 12) | P
                v.store(pdpte_addr, e, 8)
                if v.guest.paging:
                    v.write_cr3(self.root << 12)        # PDPTEs are registers: reload
            table, level = e & ~0xFFF, 2
        else:
            table = self.root << 12
            level = {PagingMode.BITS32: 2, PagingMode.LEVEL4: 4}[self.mode]
        while level > 1:
            ea = table + ((va >> (12 + bits * (level - 1))) & ((1 << bits) - 1)) * self.esz
            e = v.load(ea, self.esz)
            if not e & P:
                e = (self.alloc() << 12) | P | W | U | A
                v.store(ea, e, self.esz)
            table = e & 0x000FFFFFFFFFF000
            level -= 1
        return table + ((va >> 12) & ((1 << bits) - 1)) * self.esz

    def on_fault(self, vcpu, address, error_code):
        """Demand paging: a fresh frame, pte written once, with A (and D on a write)."""
        self.handled.append((address, error_code))
        pte = (self.alloc() << 12) | P | W | U | A | (D if error_code & 2 else 0)
        vcpu.store(self.pte_addr(address), pte, self.esz)
