"""`bench list` and `bench env`: what they print, without importing a framework in the parent."""

from __future__ import annotations

import json

import pytest

from bench import cli
from bench.core import settings
from bench.engine import protocol
from bench.run import inventory


def test_list_shows_every_framework_and_the_install_command_of_missing_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(settings, "is_installed", lambda fw: fw != "jax")
    assert cli.main(["list", "--no-probe"]) == 0
    printed = capsys.readouterr().out
    for fw in ("torch", "tensorflow", "jax"):
        assert fw in printed
    assert "pip install '.[jax]'" in printed and "GPUs (NVML):" in printed


def test_list_probe_reports_devices_from_a_worker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HGBENCH_BACKEND_OVERRIDE", "tests.fake_backend")
    monkeypatch.setattr(settings, "is_installed", lambda fw: fw == "jax")
    assert inventory.list_frameworks(probe_workers=True) == 0
    assert "cpu:0" in capsys.readouterr().out


def test_env_prints_the_environment_record_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["env"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["command_line"] == "python -m bench env"
    assert record["worker_env"] == protocol.WORKER_ENV
    assert {
        "utc_time",
        "host",
        "cpu_model",
        "cpu_cores_logical",
        "ram_bytes",
        "gpus",
        "python",
        "packages",
        "git",
    } <= set(record)


def test_overhead_prints_harness_bare_and_cell_medians(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HGBENCH_BACKEND_OVERRIDE", "tests.fake_backend")
    args = ["overhead", "--preset", "tiny", "--iters", "2", "--rounds", "2", "--warmup", "0", "--device", "cpu"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "harness loop" in printed and "bare loop" in printed and "full cell worker" in printed


@pytest.mark.parametrize("module", ["bench", "bench.regress.ab_check", "bench.experiments.ab_check_experiment",
                                    "bench.experiments.regression_check", "bench.experiments.coverage"])  # fmt: skip
def test_every_module_with_a_main_answers_help(module: str) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
