"""``shadowmmu bench ram``: boot time and peak host memory against guest RAM size.

Each guest boots in a fresh Python process (peak RSS is a per-process high-water
mark): a 64-bit guest kernel on the ``update`` shadow MMU, then one process
writes ``touch`` fresh pages (the demand workload).  With cold frames the kernel
clears a frame when it allocates it, so boot time and memory follow the pages
touched, not the guest's RAM; warm frames (boot zeroes every frame, as
init_on_free would) make both grow with RAM.  What remains per guest frame is the
kernel's 4-byte reference count and 1-byte page-cache flag (Linux keeps a
64-byte struct page).
"""

from __future__ import annotations

import json
import subprocess
import sys

DEFAULT_SIZES_MB = (64, 1024, 8192, 65536)


def _one(ram_mb: int, frames: str, touch: int) -> dict:
    import resource
    import time

    from ..guest import WORKLOADS, boot
    from ..vm import VM
    from .fault_meter import FaultMeter
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    vm = VM(ram_mb << 20, pte_write="update", pool_pages=4096)
    k = boot(vm, "64", frames=frames)
    t1 = time.perf_counter()
    boot_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    boot_frames = len(vm.host.allocated_frames())
    FaultMeter.attach(k)                  # the run as run_workload makes it, the meter's hook included
    n = WORKLOADS["demand"].setup(k, touch, 0)
    k.run(None, n)
    t2 = time.perf_counter()
    return {"ram_mb": ram_mb, "frames": frames, "boot_seconds": t1 - t0, "boot_host_frames": boot_frames,
            "boot_peak_rss_mb": boot_rss / 1024, "python_rss_mb": base / 1024, "touched_pages": touch,
            "run_seconds": t2 - t1, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "host_frames": len(vm.host.allocated_frames())}


def bench_ram(sizes_mb=DEFAULT_SIZES_MB, frames: str = "cold", touch: int = 4096, timeout: float = 600) -> list[dict]:
    """One row per guest size, each measured in its own process."""
    rows = []
    for mb in sizes_mb:
        code = ("import json, sys; from shadowmmu.analysis.bench_ram import _one; "
                f"print(json.dumps(_one({int(mb)}, {frames!r}, {int(touch)})))")
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"ram_mb": mb, "frames": frames, "error": f"did not finish in {timeout:.0f} s"})
            continue
        if r.returncode != 0:
            rows.append({"ram_mb": mb, "frames": frames, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]})
            continue
        rows.append(json.loads(r.stdout))
    return rows
