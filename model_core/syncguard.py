"""A guard against host synchronisation in the per-step path.

    with no_host_sync():
        stage.run_steps(session, chunk)       # raises HostSyncError at the first op that would make the host wait

On a GPU the host queues kernels and runs ahead; any operation that needs a device value on the host (`.item()`,
`bool(tensor)` in an `if`, `.tolist()`, `.cpu()`, `nonzero`, boolean-mask indexing whose output size depends on the
data, ...) makes it wait for every queued kernel, and the next step's launches stop overlapping this step's compute.
The hot path (a chunk's denoising steps) has none: timings use CUDA events (`sampler.StepClock`) and the only wait is
where a result leaves the device.

`result_leaves_device()` marks the one place a guarded path may wait.

`no_host_sync` holds code to that on any device: a `TorchFunctionMode` that sees every torch call and refuses the
ones that synchronise on CUDA, by name, so the CPU tests catch a sync the GPU would pay for. On CUDA it also sets
`torch.cuda.set_sync_debug_mode("error")`, which catches what the mode cannot see (syncs inside an op).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


_active: list["no_host_sync"] = []


class result_leaves_device:
    """The one place a guarded path may wait: where its result leaves the device (a chunk's step timings are
    resolved, its latents handed on). Suspends every active `no_host_sync` for the block."""

    def __enter__(self):
        self._modes = [(mode, mode.suspended) for mode in _active]
        for mode, _ in self._modes:
            mode.suspended = True
        self._cuda = None
        if _active and torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
        return self

    def __exit__(self, *exc):
        if self._cuda is not None:
            torch.cuda.set_sync_debug_mode(self._cuda)
        for mode, suspended in self._modes:
            mode.suspended = suspended
        return False


class HostSyncError(RuntimeError):
    """An operation that makes the host wait for the device ran inside `no_host_sync`."""


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


_SYNCING = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.nonzero, torch.nonzero,
    torch.Tensor.masked_select, torch.masked_select, torch.unique, torch.Tensor.unique,
    torch.unique_consecutive, torch.Tensor.argwhere, torch.argwhere, torch.Tensor.__array__,
    torch.repeat_interleave, torch.Tensor.repeat_interleave,
}
"""Calls that read a device value on the host (or size an output by the data) and so wait for the device."""


def _host_device(value) -> bool:
    return isinstance(value, (str, torch.device)) and torch.device(value).type == "cpu"


class no_host_sync(TorchFunctionMode):
    """Refuse host synchronisation inside the block (see the module docstring). `allow`: names of extra calls to
    let through (none in the per-step path)."""

    def __init__(self, allow: tuple[str, ...] = ()):
        super().__init__()
        self.allow = set(allow)
        self.suspended = False
        self._cuda_mode = None

    def __enter__(self):
        _active.append(self)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()

    def __exit__(self, *exc):
        _active.remove(self)
        if self._cuda_mode is not None:
            torch.cuda.set_sync_debug_mode(self._cuda_mode)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if not self.suspended and name not in self.allow and self._syncs(func, args, kwargs):
            raise HostSyncError(f"{name} synchronises the host with the device; the per-step path must not "
                                "(keep values on the device, time with CUDA events, copy results out once)")
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:
        if func in _SYNCING:
            return True
        if func is torch.Tensor.to:   # a copy from the device to the host (`.cpu()` is refused on any device)
            return args[0].device.type != "cpu" and any(_host_device(value)
                                                        for value in (*args[1:], kwargs.get("device")))
        if func is torch.Tensor.__getitem__ and len(args) > 1:   # boolean-mask indexing: output sized by the data
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in index)
        return False
