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


def memory_used(uuid: str | None, pid: int) -> tuple[int | None, int | None]:
    """(bytes used by process `pid` on GPU `uuid`, bytes used on the whole device); None where unknown."""
    if uuid is None:
        return None, None
    with _session() as nv:
        if nv is None:
            return None, None
        try:
            handle = nv.nvmlDeviceGetHandleByUUID(uuid.encode() if isinstance(uuid, str) else uuid)
            device_used = int(nv.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:
            return None, None
        process_used = None
        with suppress(Exception):  # per-process accounting is optional in NVML; the device figure stands
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                # usedGpuMemory is None where the driver cannot attribute memory (e.g. another PID namespace).
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    process_used = int(proc.usedGpuMemory)
        return process_used, device_used
