"""shadowmmu: an executable, verified model of x86 MMU virtualization (see README.md)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("shadowmmu")
except PackageNotFoundError:          # run from a source tree without installing
    __version__ = "0.1.0"
