"""Moved to :mod:`megatron_rcpa.runtime.cpu_shim` (a runtime feature); re-exported here for tests."""

from megatron_rcpa.runtime.cpu_shim import CudaToCpuMode, install_cpu_shim, is_cpu_shim_installed, uninstall_cpu_shim

__all__ = ["CudaToCpuMode", "install_cpu_shim", "is_cpu_shim_installed", "uninstall_cpu_shim"]
