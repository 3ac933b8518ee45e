"""NVML readings against a stand-in pynvml: device state, throttle reasons, and the process-memory lookup
that must not go silently empty inside a container (NVML reports host PIDs there)."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from bench.core import nvml

UUID = "GPU-0000aaaa"


class _NotSupported(Exception):
    pass


def _fake_pynvml(processes: list[tuple[int, int | None]], used: int = 5 * 2**30) -> types.ModuleType:
    nv = types.ModuleType("pynvml")
    handle = object()
    nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM, nv.NVML_TEMPERATURE_GPU = 1, 2, 0
    nv.nvmlInit = lambda: None
    nv.nvmlShutdown = lambda: None
    nv.nvmlSystemGetDriverVersion = lambda: b"580.1"
    nv.nvmlSystemGetCudaDriverVersion = lambda: 13000
    nv.nvmlDeviceGetCount = lambda: 1
    nv.nvmlDeviceGetHandleByIndex = lambda i: handle
    nv.nvmlDeviceGetHandleByUUID = lambda u: handle
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA H200"
    nv.nvmlDeviceGetUUID = lambda h: UUID.encode()
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=141 * 2**30, used=used)
    nv.nvmlDeviceGetClockInfo = lambda h, kind: 1980 if kind == 1 else 3201
    nv.nvmlDeviceGetMaxClockInfo = lambda h, kind: 1980
    nv.nvmlDeviceGetPowerUsage = lambda h: 123_456
    nv.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000
    nv.nvmlDeviceGetTemperature = lambda h, kind: 41
    nv.nvmlDeviceGetPersistenceMode = lambda h: 1
    nv.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x4 | 0x1

    def mig(h: object) -> tuple[int, int]:
        raise _NotSupported("not a MIG-capable GPU")

    nv.nvmlDeviceGetMigMode = mig
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in processes
    ]
    return nv


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[callable]:
    def install(processes: list[tuple[int, int | None]], used: int = 5 * 2**30) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(processes, used))

    yield install


def test_device_state_reads_clocks_power_modes_throttling_and_processes(fake_nvml) -> None:
    fake_nvml([(4242, 2**30)])
    (state,) = nvml.device_state()
    assert state["sm_clock_mhz"] == 1980 and state["power_w"] == pytest.approx(123.456)
    assert state["persistence_mode"] == 1 and state["mig_mode"] is None  # not supported: unknown, not 0
    assert state["throttle_reasons"] == ["gpu_idle", "sw_power_cap"]
    assert state["compute_processes"] == [{"pid": 4242, "used_bytes": 2**30}]


def test_process_memory_matches_the_pid_when_nvml_lists_it(fake_nvml) -> None:
    fake_nvml([(4242, 3 * 2**30)])
    assert nvml.process_memory(UUID, 4242, baseline_used=2**30) == (3 * 2**30, 5 * 2**30, nvml.LOOKUP_PID)


def test_process_memory_in_a_container_falls_back_to_device_minus_baseline(fake_nvml) -> None:
    fake_nvml([(99999, 3 * 2**30)])  # NVML shows the host PID; ours is different
    used, device, how = nvml.process_memory(UUID, 4242, baseline_used=2**30)
    assert (used, device, how) == (4 * 2**30, 5 * 2**30, nvml.LOOKUP_ONLY_PROCESS)


def test_process_memory_is_unknown_not_zero_when_others_share_the_device(fake_nvml) -> None:
    fake_nvml([(99999, 3 * 2**30), (88888, 2**30)])
    assert nvml.process_memory(UUID, 4242, baseline_used=2**30) == (None, 5 * 2**30, nvml.LOOKUP_NOT_FOUND)
    assert nvml.process_memory(None, 4242, None) == (None, None, nvml.LOOKUP_NO_NVML)


def test_throttle_reasons_names_bits_and_keeps_unknown_ones() -> None:
    assert nvml.throttle_reasons(0x40 | 0x10000) == ["hw_thermal_slowdown", "0x10000"]
    assert nvml.throttle_reasons(None) == []
