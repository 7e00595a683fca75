"""The Python model next to real x86 code: VM exits per steady fault.

The same three workloads exist twice: as Python guests (``guest.workloads``) and
as user programs of the mm kernel (``kernels/mm``), run on the real vCPU with
the same MMU.  Both are metered the same way (``fault_meter`` and
``real_fault_meter``: a steady fault's page table existed and stayed shadowed).
Frames as the model defines them: "cold", the kernel clears a frame when it
allocates it and its first touch of the frame's direct-map piece takes a hidden
#PF; "warm", boot zeroed every frame (the mm kernel's ``warm`` word), so that
piece is already shadowed.  The mm kernel allocates next-fit and so never
recycles a frame in these short runs; the model's allocator does (LIFO), so a
cold model run has warm frames again after its first children exit: cold rows
can differ in the mean, warm rows must not.  The workload sizes differ (the mm programs are smaller); a steady
fault's exits do not depend on the size.
"""

from __future__ import annotations

from pathlib import Path

from ..vm.machine import Machine
from .real_fault_meter import RealFaultMeter
from .report import fault_cases, simulate, steady_text

MM_PROGRAMS = {"demand": "demand 200", "forkwait": "forkwait 30", "kbuild": "kbuild 2"}
# model guest format (and its PAE store width) -> the mm kernel built for it
FORMATS = {("32", "halves"): "32", ("pae", "halves"): "pae", ("pae", "whole"): "pae-pte64", ("64", "halves"): "64"}


def real_run(kernels: Path, fmt: str, workload: str, policy: str, frames: str = "warm") -> dict:
    image = (kernels / f"mm-{fmt}.elf").read_bytes()
    cmd = "mm " + MM_PROGRAMS[workload] + (" warm" if frames == "warm" else "")
    m = Machine(image, cmd, policy=policy, audit=False)
    meter = RealFaultMeter(m.cpu)
    r = m.run(timeout=600)
    meter.finish()
    if r.status != 1:
        raise RuntimeError(f"mm-{fmt} {cmd} under {policy} did not finish: {r.stop_reason}")
    return {"result": r, "faults": meter.summary()}


def compare_real(kernels: Path, workloads, guests, pae_stores: str = "halves", frames=("warm", "cold"),
                 progress=None, model_size=None) -> list[dict]:
    """One row per workload x frames x guest x policy.  ``model_size``: the Python
    workload's size (None: its default); a steady fault's exits do not depend on it."""
    rows = []
    for workload in workloads:
        if workload not in MM_PROGRAMS:
            continue
        for fr in frames:
            for guest in guests:
                fmt = FORMATS[(guest, pae_stores if guest == "pae" else "halves")]
                for policy in ("zap", "update"):
                    if progress:
                        progress(f"{workload} {fr} {fmt} {policy}")
                    rows.append(_row(kernels, workload, fr, guest, fmt, policy, pae_stores, model_size))
    return rows


def _row(kernels, workload, frames, guest, fmt, policy, pae_stores, model_size) -> dict:
    real = real_run(kernels, fmt, workload, policy, frames)["faults"]
    model = simulate(workload, policy, guest, model_size, frames=frames, pae_stores=pae_stores)
    row = {"workload": workload, "frames": frames, "guest": guest, "policy": policy,
           "kernel": f"mm-{fmt}.elf " + MM_PROGRAMS[workload] + (" warm" if frames == "warm" else "")}
    for kind in ("demand", "cow"):
        mc = fault_cases(model, kind)
        rs = real[kind]["steady"]
        row[kind] = {"model": steady_text(mc), "model_faults": mc["steady_faults"],
                     "real": steady_text({"steady": rs["mean"], "steady_histogram": rs["histogram"]}),
                     "real_faults": rs["faults"]}
    return row
