"""``shadowmmu bench boot``: the real vCPU's speed on the mm kernel.

For each program and paging format: one counting run (native, a hook on every
instruction: the guest's instruction count, which is the same in every mode since
the guest cannot tell them apart), then timed runs without the hook in each mode
(best of ``repeat``).  Reported: guest instructions per second, VM exits per
second, Python time per exit by reason, and the instruction rate with the Python
time of the #PF exits taken out (what the guest code itself runs at between exits).
"""

from __future__ import annotations

from pathlib import Path

from ..vm.machine import Machine

PROGRAMS = {"demand": "demand 400", "forkwait": "forkwait 40"}
MODES = ("native", "zap", "update")


def _boot(image: bytes, cmd: str, mode: str, count: bool = False):
    m = Machine(image, "mm " + cmd, policy=mode, audit=False)
    if count:
        m.cpu.count_instructions()
    r = m.run(timeout=600)
    if r.status != 1:
        raise RuntimeError(f"mm {cmd} in {mode} mode did not finish: {r.stop_reason}")
    return r


def bench_boot(kernels: Path, formats=("32", "pae", "64"), programs=("demand", "forkwait"), repeat: int = 3,
               progress=None):
    rows = []
    for prog in programs:
        cmd = PROGRAMS[prog]
        for fmt in formats:
            path = kernels / f"mm-{fmt}.elf"
            image = path.read_bytes()
            if progress:
                progress(f"{prog} {fmt}: counting instructions")
            insns = _boot(image, cmd, "native", count=True).instructions
            for mode in MODES:
                if progress:
                    progress(f"{prog} {fmt} {mode}")
                best = min((_boot(image, cmd, mode) for _ in range(repeat)), key=lambda r: r.seconds)
                exits = best.total_exits
                pf_seconds = sum(best.exit_seconds.values())
                pf_exits = sum(best.exits.get(r, 0) for r in best.exit_seconds)
                rows.append({
                    "program": cmd, "format": fmt, "mode": mode, "seconds": best.seconds, "instructions": insns,
                    "insns_per_s": insns / best.seconds, "exits": exits, "exits_per_s": exits / best.seconds,
                    "us_per_exit": {r: 1e6 * t / best.exits[r] for r, t in best.exit_seconds.items()
                                    if best.exits.get(r)},
                    "pf_exit_seconds": pf_seconds, "pf_exits": pf_exits,
                    "insns_per_s_between_exits": insns / max(best.seconds - pf_seconds, 1e-9),
                })
    return rows
