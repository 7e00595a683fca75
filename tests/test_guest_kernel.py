"""The guest kernel: fault costs in exits, COW, SIGSEGV, frame accounting, sharing."""

import pytest

from shadowmmu.analysis.fault_meter import FaultMeter
from shadowmmu.guest import GUEST_FORMATS, boot
from shadowmmu.guest.kernel import Image
from shadowmmu.guest.user import (
    PROT_READ, PROT_WRITE, brk, exit_, fork, mmap, mprotect, munmap, wait,
)
from shadowmmu.vm import VM
from shadowmmu.x86.walker import translate

RAM = 4 << 20
POLICIES = ("native", "zap", "update")
STEADY_REASONS = {"native": {}, "zap": {"pf_injected": 1, "pte_write": 1, "pf_fixed": 1},
                  "update": {"pf_injected": 1, "pte_write": 1}}
# i386 PAE Linux (the default PAE guest) stores a pte as two 4-byte halves: neither
# covers the pte, so update_pte never fires and both policies pay 4 exits
PAE_HALVES_REASONS = {"native": {}, "zap": {"pf_injected": 1, "pte_write": 2, "pf_fixed": 1},
                      "update": {"pf_injected": 1, "pte_write": 2, "pf_fixed": 1}}
# (guest format, kernel options): "pae8" is the explicit variant writing whole 8-byte ptes
GUESTS = {"32": ("32", {}), "pae": ("pae", {}), "pae8": ("pae", {"pae_halves": False}), "64": ("64", {})}


def steady(policy, guest):
    reasons = PAE_HALVES_REASONS[policy] if guest == "pae" else STEADY_REASONS[policy]
    return sum(reasons.values()), reasons


def make_vm(policy):
    return VM(RAM, native=policy == "native", pte_write="update" if policy == "native" else policy)


def boot_kernel(policy, guest, **kw):
    vm = make_vm(policy)
    return vm, boot(vm, guest, seed=1, **kw)


def boot_metered(policy, guest, **kw):
    """A kernel with the fault meter attached, keeping every fault's (exits, by reason)."""
    vm, k = boot_kernel(policy, guest, **kw)
    meter = FaultMeter.attach(k)
    meter.keep_samples = 10_000
    return vm, k, meter


def image(k, name="prog", text=2, data=1):
    f = k.files.get(name) or k.new_file(name, text + data)
    libc = k.files.get("libc") or k.new_file("libc", 5)
    return Image(name, f, text, data, 0, ((libc, 4, 1),))


@pytest.mark.parametrize("guest", GUESTS)
@pytest.mark.parametrize("policy", POLICIES)
def test_steady_state_demand_fault_exits(policy, guest):
    vm, k, meter = boot_metered(policy, GUESTS[guest][0], **GUESTS[guest][1])
    n = 40

    def prog(u):
        addr = yield mmap(n)
        u.write(addr, n, 1, tag=3)
        u.verify()
        yield exit_(0)
    k.spawn(image(k), prog)
    k.run()
    samples = meter.samples["demand"]
    assert len(samples) == n
    # the first fault allocates the page table (its shadow does not exist yet): not steady state
    for exits, reasons in samples[2:]:
        assert (exits, reasons) == steady(policy, guest)
    assert k.events["demand_faults"] == n


@pytest.mark.parametrize("guest", GUESTS)
@pytest.mark.parametrize("policy", POLICIES)
def test_steady_state_cow_fault_exits_and_semantics(policy, guest):
    vm, k, meter = boot_metered(policy, GUESTS[guest][0], **GUESTS[guest][1])
    n = 24
    seen = {}

    def child(u, addr):
        # the parent's values are visible in the child ...
        assert u.read(addr, 1, 1) == (u.written[addr][0] ^ addr)
        u.write(addr, n, 1, tag=77)                    # copy on write: the parent still holds each page
        u.verify()
        seen["child"] = [u.ld(addr + (i << 12)) for i in range(n)]
        yield exit_(0)

    def parent(u):
        addr = yield mmap(n)
        u.write(addr, n, 1, tag=5)
        yield fork(child, addr)
        yield wait()
        meter.samples["cow"].clear()
        # ... and the child's writes are not visible in the parent
        u.verify()
        seen["parent"] = [u.ld(addr + (i << 12)) for i in range(n)]
        u.write(addr, n, 1, tag=6)                     # the last reference: reuse, no copy
        u.verify()
        yield exit_(0)
    k.spawn(image(k), parent)
    copied_before = k.events["pages_copied"]
    k.run()
    assert seen["child"] != seen["parent"]
    assert k.events["cow_faults"] == 2 * n
    assert k.events["cow_reused"] == n
    assert k.events["pages_copied"] - copied_before >= n
    samples = meter.samples["cow"]
    assert len(samples) == n                            # the parent's reuse faults
    for exits, reasons in samples[2:]:
        assert (exits, reasons) == steady(policy, guest)


@pytest.mark.parametrize("guest", GUEST_FORMATS)
def test_segv_kills_only_the_process(guest):
    vm, k = boot_kernel("update", guest)
    statuses = []

    def bad_unmapped(u):
        u.write(0x1000, 1, 1, tag=1)                 # nothing is mapped at 4 KB
        yield exit_(0)

    def bad_text_write(u):
        u.write(u.text, 1, 1, tag=1)                 # text is read-only
        yield exit_(0)

    def bad_kernel(u):
        u.ld(k.pg.page_offset + 0x100000)            # the direct map is supervisor-only
        yield exit_(0)

    def parent(u):
        addr = yield mmap(4)
        u.write(addr, 4, 4, tag=9)
        for bad in (bad_unmapped, bad_text_write, bad_kernel):
            yield fork(bad)
            statuses.append((yield wait())[1])
        u.verify()
        yield exit_(0)
    k.spawn(image(k), parent)
    k.run()
    assert statuses == [139, 139, 139]
    assert k.events["segv"] == 3
    assert len(k.segfaults) == 3


@pytest.mark.parametrize("guest", GUEST_FORMATS)
@pytest.mark.parametrize("policy", ("native", "update"))
def test_fork_exit_frees_every_frame(policy, guest):
    vm, k = boot_kernel(policy, guest)
    free = {}

    def child(u, addr):
        u.write(addr, 4, 2, tag=2)
        more = yield mmap(3)
        u.write(more, 3, 2, tag=3)
        yield exit_(0)

    def parent(u):
        addr = yield mmap(8)
        u.write(addr, 8, 2, tag=1)
        yield fork(child, addr)                      # warm: page cache, every table of the layout
        yield wait()
        free["before"] = k.nr_free()
        for _ in range(5):
            yield fork(child, addr)
            yield wait()
        free["after"] = k.nr_free()
        u.verify()
        yield exit_(0)
    k.spawn(image(k), parent)
    k.run()
    assert free["before"] == free["after"]
    # and when everything has exited only the page cache holds frames
    assert k.nr_free() == k.boot_free - len(k.page_cache)


@pytest.mark.parametrize("guest", GUEST_FORMATS)
@pytest.mark.parametrize("policy", ("native", "zap"))
def test_shared_library_pages_are_one_frame(policy, guest):
    vm, k = boot_kernel(policy, guest)
    frames = []

    def gpa_of(va):
        return translate(vm.gmem, vm.vcpu.guest, va, 0, set_ad=False).paddr

    def other(u):
        u.run(u.lib0, 4, 2)
        frames.append([gpa_of(u.lib0 + (i << 12)) for i in range(4)])
        yield exit_(0)

    k.spawn(image(k, "a"), other)
    k.spawn(image(k, "b"), other)
    k.run()
    assert len(frames) == 2 and frames[0] == frames[1]
    libc = k.files["libc"]
    assert [k.page_cache[(libc.ino, i)] for i in range(4)] == frames[0]
    assert k.events["pages_read"] == 4               # read from "disk" once, mapped twice
    assert k.events["page_cache_hits"] == 4


@pytest.mark.parametrize("guest", GUEST_FORMATS)
def test_munmap_mprotect_brk(guest):
    vm, k = boot_kernel("update", guest)
    out = {}

    def after_munmap(u, addr):
        u.ld(addr)
        yield exit_(0)

    def after_mprotect(u, addr):
        u.write(addr, 1, 1, tag=4)
        yield exit_(0)

    def prog(u):
        addr = yield mmap(6)
        u.write(addr, 6, 2, tag=1)
        yield munmap(addr + (2 << 12), 2)
        u.forget(addr + (2 << 12), 2)
        yield fork(after_munmap, addr + (2 << 12))
        out["munmap"] = (yield wait())[1]
        yield mprotect(addr, 2, PROT_READ)
        yield fork(after_mprotect, addr)
        out["mprotect"] = (yield wait())[1]
        assert u.read(addr, 1, 1) == u.written[addr][0] ^ addr
        yield mprotect(addr, 2, PROT_READ | PROT_WRITE)
        u.write(addr, 2, 2, tag=8)                   # writable again (COW reuse of our own pages)
        top = yield brk(0)
        new = yield brk(top + (5 << 12))
        u.write(top, 5, 2, tag=9)
        yield brk(top + (2 << 12))
        u.forget(top + (2 << 12), 3)
        out["brk"] = (new - top) >> 12
        u.verify()
        yield exit_(0)
    k.spawn(image(k), prog)
    k.run()
    assert out == {"munmap": 139, "mprotect": 139, "brk": 5}
    assert k.nr_free() == k.boot_free - len(k.page_cache)


@pytest.mark.parametrize("policy", ("zap", "update"))
def test_pae_halves_defeats_update_pte(policy):
    """i386 PAE writes a pte as two 4-byte halves (the default PAE guest): no store
    covers a whole pte, so the seed's update_pte never fires and a demand fault
    costs 4 exits either way."""
    vm, k, meter = boot_metered(policy, "pae")
    assert k.pae_halves

    def prog(u):
        addr = yield mmap(20)
        u.write(addr, 20, 1, tag=3)
        yield exit_(0)
    k.spawn(image(k), prog)
    k.run()
    for exits, reasons in meter.samples["demand"][2:]:
        assert reasons == {"pf_injected": 1, "pte_write": 2, "pf_fixed": 1}


COLD = {"zap": {"pf_injected": 1, "pte_write": 1, "pf_fixed": 2}, "update": {"pf_injected": 1, "pte_write": 1,
                                                                              "pf_fixed": 1}}


@pytest.mark.parametrize("guest", ("32", "64"))
@pytest.mark.parametrize("policy", ("zap", "update"))
def test_cold_frames_cost_one_more_exit_per_demand_fault(policy, guest):
    """frames="cold": the frame a demand fault allocates was never touched, so the
    kernel's clear_page through the direct map takes a hidden #PF (4 exits / 3)."""
    vm, k, meter = boot_metered(policy, guest, frames="cold")
    assert k.boot_pages_zeroed == 0

    def prog(u):
        addr = yield mmap(20)
        u.write(addr, 20, 1, tag=3)
        u.verify()
        yield exit_(0)
    k.spawn(image(k), prog)
    k.run()
    for exits, reasons in meter.samples["demand"][2:]:
        assert (exits, reasons) == (sum(COLD[policy].values()), COLD[policy])


def test_cold_boot_of_a_64_gib_guest_allocates_only_what_it_touches():
    """RAM is cleared when a frame is allocated, not at boot: booting a 64 GiB guest
    writes its boot page tables (1 + 1 + 64 page directories) and the zero page."""
    vm = VM(64 << 30, pte_write="update")
    k = boot(vm, "64", frames="cold")
    assert k.nframes == 1 << 24
    assert k.nr_free() == (1 << 24) - 0x100 - 66 - 1
    # bootmem tables + the zero page, plus the few shadow-pool frames the boot used
    guest_frames = [f for f in vm.host.allocated_frames() if f >= vm.slots[0].host_pfn]
    assert len(guest_frames) == 1 + 1 + 64 + 1
    with pytest.raises(ValueError, match="frames must be one of warm, cold"):
        boot(VM(RAM), "64", frames="tepid")


@pytest.mark.parametrize("guest", GUEST_FORMATS)
def test_the_fault_handler_tells_its_observer_what_it_classified(guest):
    """Kernel.fault_observer hears, once per fault and before the handler acts, the
    kind, the guest-physical page table holding the pte and whether the handler
    allocated that table for this fault (the guest's own knowledge, nothing more)."""
    vm, k = boot_kernel("update", guest)
    heard = []
    k.fault_observer = lambda kind, table, new_table: heard.append(
        (kind, table, new_table, k.events["demand_faults"] + k.events["cow_faults"]))

    def child(u, addr):
        u.write(addr, 1, 1, tag=8)                   # copy on write, in the child's table
        yield exit_(0)

    def parent(u):
        addr = yield mmap(2)
        u.write(addr, 2, 1, tag=7)                   # two demand faults, one table
        yield fork(child, addr)
        yield wait()
        u.ld(0x1000)                                 # nothing is mapped at 4 KB: SIGSEGV
        yield exit_(0)
    k.spawn(image(k), parent)
    k.run()
    assert [h[0] for h in heard] == ["demand", "demand", "cow", "segv"]
    (_, t0, new0, n0), (_, t1, new1, n1), (_, t2, new2, n2), segv = heard
    assert (n0, n1, n2) == (0, 1, 2)                 # heard before the handler counted the fault
    assert new0 and not new1 and not new2            # the first allocated the table, fork filled the child's
    assert t0 == t1 and t2 != t0 and not t0 & 0xFFF and not t2 & 0xFFF
    assert 0 < t0 < k.nframes << 12
    assert segv == ("segv", None, False, 3)         # after the three faults were handled


def test_the_guest_imports_no_hypervisor_layer_and_reads_no_counter():
    """The guest runs on a vCPU and measures nothing: no module of shadowmmu.guest
    imports analysis, vm or mmu, and of the VM it uses only the vCPU and the RAM size
    (measuring a run is analysis/run.py and analysis/fault_meter.py)."""
    import ast
    import importlib.util
    import pathlib

    import shadowmmu.guest
    root = pathlib.Path(shadowmmu.guest.__file__).parent
    forbidden = ("shadowmmu.analysis", "shadowmmu.vm", "shadowmmu.mmu")
    checked = 0
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(("shadowmmu", *parts))
        package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [importlib.util.resolve_name("." * node.level + (node.module or ""), package)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Attribute):
                owner = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", None)
                assert not (owner == "vm" and node.attr not in ("vcpu", "ram_pages")), f"{path}: vm.{node.attr}"
                assert node.attr not in ("mmu", "exits", "access_hook"), f"{path}: .{node.attr}"
                continue
            else:
                continue
            assert not any(n == f or n.startswith(f + ".") for n in names for f in forbidden), f"{path}: {names}"
            checked += 1
    assert checked > 20                              # the scan saw the package's imports
