"""The PC devices of a multiboot machine, driven through their ports and MMIO the way
a test kernel drives them (QEMU -kernel conventions, REAL_CONTRACT.md)."""

import struct

import pytest

from shadowmmu.vm.devices import DebugExit, FwCfg, PcDevices, PicStub, PortBus, Serial16550, XApicStub
from shadowmmu.vm.memslots import GuestPhysical, Memslot, MmioRegion
from shadowmmu.x86.memory import PhysicalMemory

MiB = 1 << 20


def machine(ram_size=64 * MiB, **kw):
    return PcDevices(ram_size, **kw)


def puts(pc, text):
    """A kernel's serial write: poll LSR bit 5, then outb THR."""
    for ch in text.encode():
        while not pc.ports.read(0x3FD, 1) & 0x20:
            pass
        pc.ports.write(0x3F8, 1, ch)


def test_serial_output_bytes_and_lsr():
    seen = []
    pc = machine(serial_sink=seen.append)
    assert pc.ports.read(0x3FD, 1) == 0x60
    puts(pc, "hello\n")
    assert pc.serial_output == b"hello\n" and bytes(seen) == b"hello\n"
    assert pc.ports.read(0x3F8, 1) == 0                   # RBR: no input
    assert pc.ports.read(0x3FA, 1) == 0x01                # IIR: no interrupt pending


def test_dlab_switches_to_the_divisor_latch_without_output():
    pc = machine()
    p = pc.ports
    p.write(0x3F9, 1, 0x00)          # IER off
    p.write(0x3FB, 1, 0x80)          # DLAB
    p.write(0x3F8, 1, 0x03)          # divisor 3: 38400 baud
    p.write(0x3F9, 1, 0x00)
    assert (p.read(0x3F8, 1), p.read(0x3F9, 1)) == (0x03, 0x00)
    p.write(0x3FB, 1, 0x03)          # 8N1, DLAB off
    p.write(0x3FA, 1, 0xC7)          # FIFOs on
    p.write(0x3FC, 1, 0x0B)
    p.write(0x3FF, 1, 0x5A)
    assert pc.serial_output == b""
    assert pc.serial.divisor == 3
    assert p.read(0x3F9, 1) == 0x00                       # IER again, not the latch
    assert (p.read(0x3FB, 1), p.read(0x3FC, 1), p.read(0x3FF, 1)) == (0x03, 0x0B, 0x5A)
    assert p.read(0x3FA, 1) == 0xC1                       # FIFOs enabled, no interrupt
    puts(pc, "x")
    assert pc.serial_output == b"x"


def test_serial_loopback_probe_reads_the_byte_back_and_prints_nothing():
    pc = machine()
    p = pc.ports
    p.write(0x3FC, 1, 0x1E)          # loopback, RTS, OUT1, OUT2
    p.write(0x3F8, 1, 0xAE)
    assert p.read(0x3FD, 1) == 0x61                       # data ready
    assert p.read(0x3F8, 1) == 0xAE
    assert p.read(0x3FD, 1) == 0x60
    p.write(0x3FC, 1, 0x0F)
    puts(pc, "ok")
    assert pc.serial_output == b"ok"


@pytest.mark.parametrize("size,value,status", [(1, 0, 1), (1, 0x10, 33), (2, 1, 3), (4, 0x7F, 255)])
def test_debug_exit_status_is_value_shifted_or_one(size, value, status):
    pc = machine()
    assert pc.exit_status is None and not pc.exited
    pc.ports.write(0xF4, size, value)
    assert pc.exited and pc.exit_status == status


def test_debug_exit_first_write_wins_and_value_is_cut_to_the_access_size():
    d = DebugExit()
    bus = PortBus()
    bus.register(0xF4, 4, d, "isa-debug-exit")
    bus.write(0xF4, 1, 0x1FF)        # outb keeps only 0xff
    bus.write(0xF4, 1, 0)
    assert d.value == 0xFF and d.status == 0x1FF


def fw_read(pc, key, n):
    pc.ports.write(0x510, 2, key)
    return bytes(pc.ports.read(0x511, 1) for _ in range(n))


def test_fw_cfg_items():
    pc = machine(ram_size=96 * MiB)
    assert fw_read(pc, 0x00, 4) == b"QEMU"
    assert fw_read(pc, 0x03, 8) == (96 * MiB).to_bytes(8, "little") == b"\x00\x00\x00\x06\x00\x00\x00\x00"
    assert fw_read(pc, 0x05, 2) == b"\x01\x00"
    assert fw_read(pc, 0x0F, 2) == b"\x01\x00"
    assert fw_read(pc, 0x01, 4) == b"\x01\x00\x00\x00"          # traditional interface, no DMA
    assert fw_read(pc, 0x05, 4) == b"\x01\x00\x00\x00"          # past the end: 0
    assert fw_read(pc, 0x19, 4) == bytes(4)                      # unknown item (file dir): 0


def test_fw_cfg_selecting_again_restarts_the_item():
    f = FwCfg(ram_size=32 * MiB)
    f.write(0x510, 2, 0x03)
    assert [f.read(0x511, 1) for _ in range(4)] == [0, 0, 0, 2]
    f.write(0x510, 2, 0x03)
    assert f.read(0x510, 1) == 0 and f.read(0x511, 1) == 0 and f.read(0x511, 1) == 0
    assert f.read(0x511, 1) == 2


def test_unknown_ports_read_all_ones_ignore_writes_and_are_counted():
    pc = machine()
    assert pc.ports.read(0x60, 1) == 0xFF
    assert pc.ports.read(0xCF8, 4) == 0xFFFFFFFF
    pc.ports.write(0x80, 1, 0)
    pc.ports.write(0x80, 1, 0)
    assert pc.ports.unknown_reads == {0x60: 1, 0xCF8: 1}
    assert pc.ports.unknown_writes == {0x80: 2}
    assert pc.serial_output == b"" and pc.exit_status is None


def test_port_bus_refuses_a_port_twice():
    bus = PortBus()
    bus.register(0x3F8, 8, Serial16550(lambda b: None), "serial")
    with pytest.raises(ValueError, match="0x3ff already belongs to serial"):
        bus.register(0x3FF, 1, DebugExit(), "other")


def test_pic_remap_then_mask_all():
    pc = machine()
    p = pc.ports
    for port, value in ((0x20, 0x11), (0xA0, 0x11), (0x21, 0x20), (0xA1, 0x28), (0x21, 0x04), (0xA1, 0x02),
                        (0x21, 0x01), (0xA1, 0x01)):
        p.write(port, 1, value)
    assert pc.pic.vector_base == [0x20, 0x28]
    assert (p.read(0x21, 1), p.read(0xA1, 1)) == (0, 0)       # initialization cleared the masks
    p.write(0x21, 1, 0xFF)
    p.write(0xA1, 1, 0xFB)
    assert (p.read(0x21, 1), p.read(0xA1, 1)) == (0xFF, 0xFB)
    assert p.read(0x20, 1) == 0


def test_pic_single_mode_without_icw4_takes_only_icw2():
    pic = PicStub()
    pic.write(0x20, 1, 0x12)         # ICW1: single, no ICW4
    pic.write(0x21, 1, 0x40)         # ICW2
    pic.write(0x21, 1, 0xFE)         # already OCW1
    assert pic.vector_base[0] == 0x40 and pic.read(0x21, 1) == 0xFE


def test_xapic_registers():
    apic = XApicStub()
    base = 0xFEE00000
    assert apic.read(base + 0x20, 4) == 0
    assert apic.read(base + 0x30, 4) == 0x50014
    assert apic.read(base + 0xF0, 4) == 0xFF
    apic.write(base + 0xF0, 4, 0x1FF)
    assert apic.read(base + 0xF0, 4) == 0x1FF
    apic.write(base + 0x310, 4, 0x01000000)
    apic.write(base + 0x300, 4, 0x000C4500)             # INIT to all but self
    assert apic.read(base + 0x300, 4) == 0x000C4500
    assert apic.read(base + 0x300, 4) & (1 << 12) == 0
    apic.write(base + 0x300, 4, 0x1000 | 0x40)          # software cannot set delivery status
    assert apic.read(base + 0x300, 4) == 0x40
    assert apic.read(base + 0x310, 4) == 0x01000000
    apic.write(base + 0x80, 4, 0x20)                     # TPR: accepted, reads 0 here
    assert apic.read(base + 0x80, 4) == 0
    assert apic.writes == [(0xF0, 0x1FF), (0x310, 0x01000000), (0x300, 0x000C4500), (0x300, 0x1040), (0x80, 0x20)]


def test_xapic_ignores_accesses_that_are_not_aligned_dwords():
    apic = XApicStub()
    base = 0xFEE00000
    assert apic.read(base + 0x30, 2) == 0 and apic.read(base + 0x31, 4) == 0 and apic.read(base + 0x30, 8) == 0
    apic.write(base + 0xF0, 1, 0)
    apic.write(base + 0xF2, 4, 0)
    assert apic.read(base + 0xF0, 4) == 0xFF and apic.writes == []


def test_xapic_through_guest_physical_mmio():
    pc = machine()
    host = PhysicalMemory(size=16 << 12, maxphyaddr=40)
    (gpa, size, handler, name), = pc.mmio
    phys = GuestPhysical(host, [Memslot(0, 16, 0)], [MmioRegion(gpa, size, handler, name)])
    assert (gpa, size, name) == (0xFEE00000, 0x1000, "xapic")
    assert phys.read_uint(0xFEE00030, 4) == 0x50014
    phys.write_uint(0xFEE000F0, 0x10F, 4)
    assert phys.read_uint(0xFEE000F0, 4) == 0x10F
    assert pc.apic.writes == [(0xF0, 0x10F)]


def test_two_machines_do_not_share_state():
    a, b = machine(), machine(ram_size=32 * MiB)
    puts(a, "a")
    a.ports.write(0xF4, 1, 1)
    assert b.serial_output == b"" and b.exit_status is None
    assert fw_read(b, 0x03, 8) == struct.pack("<Q", 32 * MiB)
