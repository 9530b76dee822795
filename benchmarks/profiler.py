"""Where a step's time goes: torch.profiler over a few steps, reduced to the figures that say whether a loop keeps
the GPU busy (issue 14), for gpu.py's bare step (`profile_calls`) and the product's loop in its worker
(`StepProfile`, started and stopped by common.timed_train_loop at step boundaries).

Per step: wall seconds (under the profiler, which adds a few microseconds per op), the GPU's kernel seconds and
their share of the wall (device busy: below 1 the GPU waits on the host), kernel launches, host-device
synchronisations (cuda*Synchronize calls) and tensor reads into Python (aten::_local_scalar_dense: .item(),
float(), bool() of a tensor), the kernels that take most of the time and the host ops that take most of the
host's (self time). On a CPU there are no kernels: device
figures are None, the op counts still hold.
"""

from __future__ import annotations

import time

import torch
from torch.autograd import DeviceType

SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}
LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}
READS = {"aten::_local_scalar_dense"}


class StepProfile:
    """torch.profiler from start() to stop(steps); stop returns the summary of the steps in between."""

    def __init__(self, device: torch.device):
        self.device = device
        self._prof = None
        self._t0 = 0.0

    def start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def stop(self, steps: int) -> dict:
        self._sync()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        return summarize(self._prof.key_averages(), wall, steps)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def summarize(averages, wall_s: float, steps: int, top: int = 8) -> dict:
    """The per-step figures of a profile's key_averages() over `steps` steps that took `wall_s`."""
    kernels = sorted((e for e in averages if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.self_device_time_total, reverse=True)
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6

    def per_step(names: set[str]) -> float:
        return sum(e.count for e in averages if e.key in names) / steps

    return {"steps": steps, "wall_s": wall_s / steps,
            "kernel_s": kernel_s / steps if kernels else None,
            "device_busy": kernel_s / wall_s if kernels else None,
            "launches": per_step(LAUNCHES), "syncs": per_step(SYNCS), "reads": per_step(READS),
            "top_kernels": [{"name": e.key[:90], "s": e.self_device_time_total / 1e6 / steps,
                             "share": e.self_device_time_total / 1e6 / kernel_s} for e in kernels[:top]],
            "top_host_ops": [{"name": e.key[:90], "s": e.self_cpu_time_total / 1e6 / steps, "calls": e.count / steps}
                             for e in sorted((e for e in averages if e.device_type == DeviceType.CPU),
                                             key=lambda e: e.self_cpu_time_total, reverse=True)[:top]]}


def profile_calls(fn, steps: int, device: torch.device) -> dict:
    """Call `fn` (one training step) `steps` times under the profiler; its summary."""
    profile = StepProfile(device)
    profile.start()
    for _ in range(steps):
        fn()
    return profile.stop(steps)
