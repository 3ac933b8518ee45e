"""`bench doctor`: each problem that makes numbers untrustworthy is found, named with its fix, and fails."""

from __future__ import annotations

import pytest

from bench.run import doctor


def _info(gpu: bool, **runtime: object) -> dict[str, object]:
    return {"status": "ok", "error": "", "gpu_available": gpu, "runtime_info": {"devices": ["cpu"], **runtime}}


def test_doctor_fails_a_cpu_build_when_nvml_sees_a_gpu_and_names_the_cuda_install() -> None:
    checks = doctor.framework_checks({"torch": _info(False), "jax": _info(True, cuda_version="12.8")}, gpu_visible=True)
    by_name = {c.name: c for c in checks}
    assert by_name["torch: sees the GPU"].status == doctor.FAIL
    assert by_name["torch: sees the GPU"].fix == "install its CUDA build: pip install '.[torch-gpu]'"
    assert by_name["jax: devices"].status == doctor.OK and by_name["jax: CUDA build"].detail == "cuda_version 12.8"
    assert by_name["tensorflow: installed"].status == doctor.WARN
    assert "pip install '.[tensorflow]'" in by_name["tensorflow: installed"].fix


def test_doctor_warns_about_tf32_defaults_on_a_gpu() -> None:
    checks = doctor.framework_checks({"torch": _info(True, cudnn_allow_tf32=True)}, gpu_visible=True)
    (tf32,) = [c for c in checks if c.name == "torch: TF32 default"]
    assert tf32.status == doctor.WARN and "cudnn_allow_tf32" in tf32.detail


def test_doctor_gpu_checks_flag_other_processes_throttling_and_modes() -> None:
    state = {"index": 0, "sm_clock_mhz": 900, "sm_clock_max_mhz": 1980, "throttle_reasons": ["gpu_idle", "hw_slowdown"],
             "persistence_mode": 0, "mig_mode": 1, "compute_processes": [{"pid": 1}, {"pid": 77}]}  # fmt: skip
    checks = {c.name: c for c in doctor.gpu_checks([state], own_pid=1)}
    assert checks["GPU 0: other processes"].status == doctor.FAIL and "77" in checks["GPU 0: other processes"].detail
    assert checks["GPU 0: throttling"].detail == "hw_slowdown"  # idle alone is no problem
    assert checks["GPU 0: SM clock"].status == doctor.WARN
    assert checks["GPU 0: persistence mode"].fix == "nvidia-smi -pm 1 (as root)"
    assert checks["GPU 0: MIG"].status == doctor.WARN


@pytest.mark.parametrize(("load", "status"), [(1.6, doctor.FAIL), (0.4, doctor.OK)])
def test_doctor_cpu_load_against_usable_cores(load: float, status: str) -> None:
    (check, governor, threads) = doctor.cpu_checks([load, 0, 0], 2, "powersave", {"torch": 2, "jax": 1}, None)
    assert check.status == status
    assert governor.status == doctor.WARN and "performance" in governor.fix
    assert threads.status == doctor.WARN and threads.detail == "frameworks differ: torch 2, jax 1"


def test_doctor_exit_code_is_1_only_when_something_fails(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(doctor.nvml, "gpu_present", lambda: False)
    monkeypatch.setattr(doctor.settings_mod, "is_installed", lambda fw: fw == "jax")
    monkeypatch.setattr(doctor.envinfo, "load_average", lambda: [0.1, 0.1, 0.1])
    assert doctor.run_doctor(ask=lambda fw: _info(False)) == 0
    assert "no problem that would make a run untrustworthy" in capsys.readouterr().out
    monkeypatch.setattr(doctor.envinfo, "load_average", lambda: [9.0, 9.0, 9.0])
    assert doctor.run_doctor(ask=lambda fw: _info(False)) == 1
    assert "CPU load" in capsys.readouterr().out
