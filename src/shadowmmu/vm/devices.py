"""The PC devices a multiboot test kernel expects (QEMU ``-kernel`` conventions).

Port devices hang on a ``PortBus`` and answer ``read(port, size) -> int`` and
``write(port, size, value)`` with the absolute port number; the xAPIC stub is a
memslots MMIO handler (``read(gpa, size)``, ``write(gpa, size, value)``, absolute
guest-physical address).  Nothing raises interrupts: the machine has no timers
and devices never interrupt (docs: REAL_CONTRACT.md).

- ``Serial16550``  COM1 at 0x3f8-0x3ff: transmit only, always ready (LSR = 0x60)
- ``DebugExit``    QEMU's isa-debug-exit at 0xf4: status = (value << 1) | 1
- ``FwCfg``        QEMU's fw_cfg, the port interface (selector 0x510, data 0x511), no DMA
- ``PicStub``      the two 8259s' command/mask ports: masks kept, nothing delivered
- ``XApicStub``    local APIC registers at 0xfee00000 that start-up code touches
- ``PcDevices``    one machine's set of them
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Callable


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class PortBus:
    """I/O ports -> devices.  An access goes to the device registered for its first
    port (devices handle their own access sizes).  A port with no device reads as
    all ones and drops writes, as an ISA bus with nothing on it; those accesses are
    counted per port (``unknown_reads``, ``unknown_writes``) for the run's report."""

    def __init__(self):
        self._devices: dict[int, object] = {}
        self.names: dict[int, str] = {}
        self.unknown_reads: Counter = Counter()
        self.unknown_writes: Counter = Counter()

    def register(self, first: int, count: int, device, name: str) -> None:
        for port in range(first, first + count):
            if port in self._devices:
                raise ValueError(f"port {port:#x} already belongs to {self.names[port]}")
        for port in range(first, first + count):
            self._devices[port] = device
            self.names[port] = name

    def device(self, port: int):
        return self._devices.get(port)

    def read(self, port: int, size: int) -> int:
        dev = self._devices.get(port)
        if dev is None:
            self.unknown_reads[port] += 1
            return _ones(size)
        return dev.read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        dev = self._devices.get(port)
        if dev is None:
            self.unknown_writes[port] += 1
            return
        dev.write(port, size, value & _ones(size))


class Serial16550:
    """A 16550 UART that transmits at once and never receives.

    Registers by offset from ``base`` (DLAB = LCR bit 7):
      0  read RBR (0: no input) / write THR (one byte to ``sink``); DLAB: divisor latch low
      1  IER (bits 0-3); DLAB: divisor latch high
      2  read IIR (0x01: no interrupt pending; 0xc0 set while FIFOs are enabled) / write FCR
      3  LCR          4  MCR (bits 0-4)        5  LSR: 0x60 (THR and transmitter empty)
      6  MSR          7  SCR
    Loopback (MCR bit 4), which serial probes use ("write 0xAE, read it back"), sends
    THR to RBR instead of the sink and sets LSR.DR until RBR is read; MSR then mirrors
    the MCR outputs.  A wider access is a sequence of byte accesses, as on ISA."""

    LSR_DR = 0x01
    LSR_THRE_TEMT = 0x60

    def __init__(self, sink: Callable[[int], None], base: int = 0x3F8):
        self.base = base
        self.sink = sink
        self.dll = 0x0C          # 9600 baud, a common BIOS setting
        self.dlm = 0
        self.ier = 0
        self.fcr = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.rbr: int | None = None   # the looped-back byte waiting to be read

    def read(self, port: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(port + i - self.base) << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(port + i - self.base, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, reg: int) -> int:
        dlab = self.lcr & 0x80
        if reg == 0:
            if dlab:
                return self.dll
            byte, self.rbr = self.rbr, None
            return byte or 0
        if reg == 1:
            return self.dlm if dlab else self.ier
        if reg == 2:
            return 0x01 | (0xC0 if self.fcr & 1 else 0)
        if reg == 3:
            return self.lcr
        if reg == 4:
            return self.mcr
        if reg == 5:
            return self.LSR_THRE_TEMT | (self.LSR_DR if self.rbr is not None else 0)
        if reg == 6:
            if self.mcr & 0x10:
                # loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
                m = self.mcr
                return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            return 0xB0      # DCD, DSR, CTS: a terminal is attached (QEMU's chardev)
        if reg == 7:
            return self.scr
        return 0xFF

    def _write_byte(self, reg: int, byte: int) -> None:
        dlab = self.lcr & 0x80
        if reg == 0:
            if dlab:
                self.dll = byte
            elif self.mcr & 0x10:
                self.rbr = byte
            else:
                self.sink(byte)
        elif reg == 1:
            if dlab:
                self.dlm = byte
            else:
                self.ier = byte & 0x0F
        elif reg == 2:
            self.fcr = byte
        elif reg == 3:
            self.lcr = byte
        elif reg == 4:
            self.mcr = byte & 0x1F
        elif reg == 7:
            self.scr = byte
        # LSR and MSR writes (factory test) are ignored

    @property
    def divisor(self) -> int:
        return self.dlm << 8 | self.dll


class DebugExit:
    """QEMU's isa-debug-exit: a write of ``value`` (1, 2 or 4 bytes) ends the run with
    status ``(value << 1) | 1`` - QEMU's process exit status, so a guest cannot exit 0.
    The first write wins; the runner polls ``exited``.  Reads return all ones."""

    def __init__(self):
        self.exited = False
        self.value: int | None = None
        self.status: int | None = None

    def read(self, port: int, size: int) -> int:
        return _ones(size)

    def write(self, port: int, size: int, value: int) -> None:
        if not self.exited:
            self.exited = True
            self.value = value
            self.status = (value << 1) | 1


class FwCfg:
    """QEMU's fw_cfg, port interface: a 16-bit write to ``base`` selects an item (key =
    value & 0x3fff, bit 14 is the write flag, bit 15 the arch-local flag) and resets the
    offset; byte reads at ``base`` or ``base + 1`` return the item's next byte, 0 past
    its end or for an unknown item.  Byte writes (the old data-write path) are
    ignored, as since QEMU 2.4; other access sizes read all ones and are ignored.
    ID reports the traditional interface only (no DMA)."""

    SIGNATURE = 0x00
    ID = 0x01
    RAM_SIZE = 0x03
    NB_CPUS = 0x05
    MAX_CPUS = 0x0F

    def __init__(self, ram_size: int, cpus: int = 1, base: int = 0x510):
        self.base = base
        self.items: dict[int, bytes] = {
            self.SIGNATURE: b"QEMU",
            self.ID: struct.pack("<I", 1),
            self.RAM_SIZE: struct.pack("<Q", ram_size),
            self.NB_CPUS: struct.pack("<H", cpus),
            self.MAX_CPUS: struct.pack("<H", cpus),
        }
        self.key = 0
        self.offset = 0
        self.invalid = 0

    def read(self, port: int, size: int) -> int:
        if size != 1:
            self.invalid += 1
            return _ones(size)
        data = self.items.get(self.key, b"")
        byte = data[self.offset] if self.offset < len(data) else 0
        self.offset += 1
        return byte

    def write(self, port: int, size: int, value: int) -> None:
        if size == 2 and port == self.base:
            self.key = value & 0x3FFF
            self.offset = 0
        elif size != 1:
            self.invalid += 1


class PicStub:
    """The two 8259 PICs as start-up code sees them: ICW1 (a command-port write with
    bit 4 set) starts an initialization whose next data-port writes are ICW2 (vector
    base), ICW3 unless ICW1 says single (bit 1) and ICW4 if ICW1 asks (bit 0);
    initialization clears the mask.  Other data-port writes set the mask (OCW1),
    which reads back; command-port reads (IRR/ISR) are 0, and OCW2/OCW3 (EOI, read
    selects) are accepted.  No interrupt is ever raised."""

    PORTS = {0x20: (0, False), 0x21: (0, True), 0xA0: (1, False), 0xA1: (1, True)}   # port -> (chip, data port)

    def __init__(self):
        self.mask = [0, 0]
        self.vector_base = [0x08, 0x70]            # the BIOS's real-mode vectors until ICW2
        self._pending: list[list[str]] = [[], []]  # ICWs still expected on each data port

    def read(self, port: int, size: int) -> int:
        chip, data = self.PORTS[port]
        return self.mask[chip] if data else 0

    def write(self, port: int, size: int, value: int) -> None:
        chip, data = self.PORTS[port]
        value &= 0xFF
        if not data:
            if value & 0x10:                       # ICW1
                self._pending[chip] = ["icw2"] + ([] if value & 2 else ["icw3"]) + (["icw4"] if value & 1 else [])
                self.mask[chip] = 0
            return                                 # OCW2/OCW3: nothing pending to acknowledge
        if self._pending[chip]:
            if self._pending[chip].pop(0) == "icw2":
                self.vector_base[chip] = value & 0xF8
        else:
            self.mask[chip] = value


class XApicStub:
    """The local APIC registers that start-up code touches, at ``base`` (4 KiB), as a
    memslots MMIO handler.  Registers are 32 bits wide on 16-byte boundaries: an
    access that is not 4 bytes at a 4-byte-aligned offset reads 0 and is dropped
    (the SDM leaves it undefined; we pick the harmless answer).

      +0x20  ID         reads 0 (APIC ID 0, one CPU)
      +0x30  version    0x50014 (integrated APIC, 6 LVT entries), as QEMU's
      +0xf0  SPIV       read/write, bits 0-9 (vector, software enable, focus); resets to 0xff
      +0x300 ICR low    read/write; delivery status (bit 12) always reads 0: sent at once
      +0x310 ICR high   read/write, destination bits 24-31
    Every other register reads 0 and accepts writes.  All well-formed writes are
    recorded in ``writes`` as (offset, value)."""

    ID = 0x20
    VERSION = 0x30
    SPIV = 0xF0
    ICR_LOW = 0x300
    ICR_HIGH = 0x310
    VERSION_VALUE = 0x50014
    ICR_BUSY = 1 << 12

    def __init__(self, base: int = 0xFEE00000):
        self.base = base
        self.spiv = 0xFF
        self.icr_low = 0
        self.icr_high = 0
        self.writes: list[tuple[int, int]] = []

    def read(self, gpa: int, size: int) -> int:
        off = gpa - self.base
        if size != 4 or off & 3:
            return 0
        if off == self.VERSION:
            return self.VERSION_VALUE
        if off == self.SPIV:
            return self.spiv
        if off == self.ICR_LOW:
            return self.icr_low
        if off == self.ICR_HIGH:
            return self.icr_high
        return 0                            # ID 0 and every other register

    def write(self, gpa: int, size: int, value: int) -> None:
        off = gpa - self.base
        if size != 4 or off & 3:
            return
        value &= 0xFFFFFFFF
        self.writes.append((off, value))
        if off == self.SPIV:
            self.spiv = value & 0x3FF
        elif off == self.ICR_LOW:
            self.icr_low = value & ~self.ICR_BUSY
        elif off == self.ICR_HIGH:
            self.icr_high = value & 0xFF000000


class PcDevices:
    """The devices of one machine: serial output collected in ``serial_output`` (and
    passed to ``serial_sink`` too, if given), ``ports`` for IN/OUT, ``mmio`` as
    (gpa, size, handler, name) rows for the memslots, ``exit_status`` once the
    guest has written to isa-debug-exit."""

    SERIAL = 0x3F8
    DEBUG_EXIT = 0xF4
    DEBUG_EXIT_PORTS = 4        # QEMU's -device isa-debug-exit,iobase=0xf4,iosize=0x04
    FW_CFG = 0x510
    APIC_BASE = 0xFEE00000

    def __init__(self, ram_size: int, *, cpus: int = 1, serial_sink: Callable[[int], None] | None = None):
        self.serial_output = bytearray()
        out = self.serial_output
        if serial_sink is None:
            sink = out.append
        else:
            def sink(byte: int) -> None:
                out.append(byte)
                serial_sink(byte)
        self.serial = Serial16550(sink, self.SERIAL)
        self.debug_exit = DebugExit()
        self.fw_cfg = FwCfg(ram_size, cpus, self.FW_CFG)
        self.pic = PicStub()
        self.apic = XApicStub(self.APIC_BASE)
        self.ports = PortBus()
        self.ports.register(self.SERIAL, 8, self.serial, "serial")
        self.ports.register(self.DEBUG_EXIT, self.DEBUG_EXIT_PORTS, self.debug_exit, "isa-debug-exit")
        self.ports.register(self.FW_CFG, 2, self.fw_cfg, "fw_cfg")
        for port in PicStub.PORTS:
            self.ports.register(port, 1, self.pic, "pic")
        self.mmio: list[tuple[int, int, object, str]] = [(self.APIC_BASE, 0x1000, self.apic, "xapic")]

    @property
    def exited(self) -> bool:
        return self.debug_exit.exited

    @property
    def exit_status(self) -> int | None:
        return self.debug_exit.status
