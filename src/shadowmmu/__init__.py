"""shadowmmu: an executable, verified model of x86 MMU virtualization (see README.md).

The simple path, from a script or a notebook::

    import shadowmmu
    for policy in ("zap", "update"):
        vm = shadowmmu.VM(64 << 20, policy=policy)             # guest RAM, shadow MMU policy
        r = shadowmmu.run_workload(vm, "demand", guest="64", size=64)
        print(policy, r["total_exits_during_workload"], r["exits_during_workload"])
    print(shadowmmu.VM(64 << 20, native=True).policy)         # "native": no hypervisor

``VM`` (``shadowmmu.vm``) is the machine, ``WORKLOADS`` / ``GUEST_FORMATS``
(``shadowmmu.guest``) name the Linux-like guest's workloads and paging formats,
``run_workload`` (``shadowmmu.analysis.run``) boots the guest, runs a workload and
measures it, ``POLICIES`` names the MMU's pte-write policies.  docs/api.md has a
longer example; docs/design.md says what lives where.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("shadowmmu")
except PackageNotFoundError:          # run from a source tree without installing
    __version__ = "0.1.0"

# The simple path, imported on first use so that `import shadowmmu` stays cheap.
_EXPORTS = {"VM": "shadowmmu.vm", "run_workload": "shadowmmu.analysis.run", "WORKLOADS": "shadowmmu.guest",
            "GUEST_FORMATS": "shadowmmu.guest", "POLICIES": "shadowmmu.mmu"}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shadowmmu' has no attribute {name!r}")
