"""NVML (pynvml) queries: which GPUs exist and how much memory a process and a device use.

Every function degrades to "nothing" (empty list, None) where NVML or a GPU is missing, so callers
record an empty figure rather than zero.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any


@contextmanager
def _session() -> Iterator[Any]:
    """pynvml initialised for the duration of the block, or None when NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no device: all mean "no NVML"
        yield None
        return
    try:
        yield pynvml
    finally:
        with suppress(Exception):  # shutting down a session that already failed has nothing to release
            pynvml.nvmlShutdown()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpus() -> list[dict[str, object]]:
    """Every GPU NVML sees: index, name, uuid, memory_total_bytes, plus driver and CUDA versions."""
    with _session() as nv:
        if nv is None:
            return []
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
            cuda = nv.nvmlSystemGetCudaDriverVersion()  # e.g. 12040 for CUDA 12.4
            cuda_version = f"{cuda // 1000}.{(cuda % 1000) // 10}"
            found = []
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                found.append(
                    {
                        "index": index,
                        "name": _text(nv.nvmlDeviceGetName(handle)),
                        "uuid": _text(nv.nvmlDeviceGetUUID(handle)),
                        "memory_total_bytes": int(nv.nvmlDeviceGetMemoryInfo(handle).total),
                        "driver_version": driver,
                        "cuda_driver_version": cuda_version,
                    }
                )
            return found
        except Exception:
            return []


def gpu_present() -> bool:
    """True when NVML sees at least one GPU and CUDA_VISIBLE_DEVICES does not hide them all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return bool(gpus())


def visible_gpu_uuid() -> str | None:
    """UUID of the GPU a framework calls device 0: the first CUDA_VISIBLE_DEVICES entry, else NVML's first."""
    found = gpus()
    if not found:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return str(found[0]["uuid"])
    first = visible.split(",")[0].strip()
    if first.isdigit():
        index = int(first)
        return str(found[index]["uuid"]) if index < len(found) else None
    # An entry may be a UUID or a unique prefix of one ("GPU-8f3a").
    matches = [str(g["uuid"]) for g in found if str(g["uuid"]).startswith(first)]
    return matches[0] if len(matches) == 1 else None


# ---------------------------------------------------------------- device state that changes numbers

# NVML's clocks-event (throttle) reason bits, named as nvml.h names them; "gpu_idle" alone is harmless.
_THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}  # fmt: skip


def _call(default: object, function: object, *args: object) -> object:
    """One NVML query; `default` where the driver or device does not support it (NVML raises then)."""
    try:
        return function(*args)  # type: ignore[operator]
    except Exception:  # NVMLError_NotSupported and friends: that figure is unknown, the others still count
        return default


def throttle_reasons(mask: int | None) -> list[str]:
    """Names of the set clocks-event reason bits (unknown bits as hex)."""
    if mask is None:
        return []
    names = [name for bit, name in _THROTTLE_REASONS.items() if mask & bit]
    rest = mask & ~sum(_THROTTLE_REASONS)
    return names + ([hex(rest)] if rest else [])


def device_state() -> list[dict[str, object]]:
    """Per GPU: clocks now and at most, power draw and limit, temperature, persistence and MIG mode, the
    clocks-event (throttle) reasons, and the compute processes on it with their memory. Unknown is None."""
    with _session() as nv:
        if nv is None:
            return []
        states = []
        for index in range(int(_call(0, nv.nvmlDeviceGetCount))):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            sm, mem = nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM
            power = _call(None, nv.nvmlDeviceGetPowerUsage, handle)  # milliwatts
            limit = _call(None, nv.nvmlDeviceGetEnforcedPowerLimit, handle)
            mig = _call(None, nv.nvmlDeviceGetMigMode, handle)
            processes = _call([], nv.nvmlDeviceGetComputeRunningProcesses, handle) or []
            reasons = _call(None, nv.nvmlDeviceGetCurrentClocksThrottleReasons, handle)
            states.append({
                "index": index,
                "uuid": _text(_call("", nv.nvmlDeviceGetUUID, handle)),
                "sm_clock_mhz": _call(None, nv.nvmlDeviceGetClockInfo, handle, sm),
                "sm_clock_max_mhz": _call(None, nv.nvmlDeviceGetMaxClockInfo, handle, sm),
                "memory_clock_mhz": _call(None, nv.nvmlDeviceGetClockInfo, handle, mem),
                "power_w": None if power is None else int(power) / 1000,
                "power_limit_w": None if limit is None else int(limit) / 1000,
                "temperature_c": _call(None, nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
                "persistence_mode": _call(None, nv.nvmlDeviceGetPersistenceMode, handle),
                "mig_mode": None if mig is None else mig[0],  # (current, pending)
                "throttle_reasons": throttle_reasons(None if reasons is None else int(reasons)),
                "compute_processes": [
                    {"pid": int(proc.pid), "used_bytes": None if proc.usedGpuMemory is None else int(proc.usedGpuMemory)}
                    for proc in processes
                ],
            })  # fmt: skip
        return states


# Where a process's GPU memory figure came from (the nvml_process_lookup column).
LOOKUP_PID = "pid"  # NVML listed this process's PID
LOOKUP_ONLY_PROCESS = "device_minus_baseline"  # PIDs differ (a container): device used minus the reading
#   taken before the framework loaded, valid only while this is the device's one compute process
LOOKUP_NOT_FOUND = "not_found"  # PIDs differ and other processes share the device: unknown
LOOKUP_NO_NVML = "no_nvml"


def process_memory(uuid: str | None, pid: int, baseline_used: int | None) -> tuple[int | None, int | None, str]:
    """(bytes this process uses on GPU `uuid`, bytes used on the device, how the first was found).

    NVML reports host PIDs, so inside a container os.getpid() matches nothing; then, if this is the only
    compute process on the device, the device's used memory minus `baseline_used` (read before the
    framework touched the GPU) stands in, and the lookup says so. Otherwise the figure is unknown (None),
    never 0.
    """
    if uuid is None:
        return None, None, LOOKUP_NO_NVML
    with _session() as nv:
        if nv is None:
            return None, None, LOOKUP_NO_NVML
        try:
            handle = nv.nvmlDeviceGetHandleByUUID(uuid.encode())
            device_used = int(nv.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:
            return None, None, LOOKUP_NO_NVML
        processes = _call([], nv.nvmlDeviceGetComputeRunningProcesses, handle) or []
        for proc in processes:
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory), device_used, LOOKUP_PID
        if len(processes) <= 1 and baseline_used is not None:
            return max(device_used - baseline_used, 0), device_used, LOOKUP_ONLY_PROCESS
        return None, device_used, LOOKUP_NOT_FOUND

