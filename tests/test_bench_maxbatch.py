"""`bench maxbatch`: doubling then bisection finds the largest batch under a memory budget; probes are kept."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench import cli
from bench.core import settings
from bench.core.settings import SettingsError
from bench.run import maxbatch


def _synthetic(budget: int, per_image: int, oom_above: int | None = None):
    """A probe whose peak grows with the batch (per_image bytes each) and that runs out of memory above a batch."""
    made: list[int] = []

    def probe(batch: int) -> maxbatch.Probe:
        made.append(batch)
        if oom_above is not None and batch > oom_above:
            return maxbatch.Probe(batch, "oom", "CUDA out of memory", False, None, None, None)
        peak = per_image * batch
        return maxbatch.Probe(batch, "ok", "", peak <= budget, peak, 1.0 + 0.01 * batch, batch / (1.0 + 0.01 * batch))

    return probe, made


def test_search_doubles_then_bisects_to_the_largest_batch_within_budget() -> None:
    probe, made = _synthetic(budget=700, per_image=10)  # 70 images fit, 71 do not
    probes = maxbatch.search(probe, start=1, limit=4096)
    assert made[:8] == [1, 2, 4, 8, 16, 32, 64, 128]  # doubling until 128 does not fit
    assert made[8:] == [96, 80, 72, 68, 70, 71]  # bisection between 64 and 128
    row = maxbatch.summarize({"framework": "torch"}, probes, 4096)
    assert row["largest_batch"] == 70 and row["largest_peak_bytes"] == 700 and row["limited_by"] == "memory"
    assert row["best_batch"] == 70 and row["status"] == "ok"


def test_search_treats_out_of_memory_as_not_fitting_and_stops_on_other_failures() -> None:
    probe, _ = _synthetic(budget=10**9, per_image=1, oom_above=40)
    row = maxbatch.summarize({}, maxbatch.search(probe, 1, 4096), 4096)
    assert row["largest_batch"] == 40

    def crash(batch: int) -> maxbatch.Probe:
        return maxbatch.Probe(batch, "failed", "worker died of SIGSEGV", False, None, None, None)

    row = maxbatch.summarize({}, maxbatch.search(crash, 1, 4096), 4096)
    assert row["status"] == "failed" and row["error"] == "probe at batch 1: worker died of SIGSEGV"


def test_search_stops_at_the_limit_and_says_so() -> None:
    probe, made = _synthetic(budget=10**9, per_image=1)
    row = maxbatch.summarize({}, maxbatch.search(probe, 3, 20), 20)
    assert made == [3, 6, 12, 20] and row["largest_batch"] == 20 and row["limited_by"] == "search limit"


@pytest.mark.parametrize(("text", "expected"), [("4GiB", 4 * 2**30), ("512 MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1000", 1000)])
def test_parse_bytes_reads_sizes(text: str, expected: int) -> None:
    assert maxbatch.parse_bytes("--memory-budget", text) == expected


def test_parse_bytes_rejects_what_is_not_a_size() -> None:
    with pytest.raises(SettingsError, match=r"--memory-budget must be a size such as 4GiB, 512MiB or 2GB, got '4 parsecs'"):
        maxbatch.parse_bytes("--memory-budget", "4 parsecs")


def test_maxbatch_cli_writes_probes_summary_and_figure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("HGBENCH_BACKEND_OVERRIDE", "tests.fake_backend")
    monkeypatch.setattr(settings.nvml, "gpu_present", lambda: False)
    args = ["maxbatch", "--preset", "tiny", "--framework", "jax", "--phase", "forward", "--memory-budget", "8GiB",
            "--limit", "8", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    probes = pd.read_csv(run_dir / "probes.csv")
    assert list(probes["batch_size"]) == [1, 2, 4, 8] and probes["fits"].all()
    assert set(probes["memory_source"]) == {"host_peak_rss_bytes"}
    summary = pd.read_csv(run_dir / "maxbatch.csv")
    assert summary.loc[0, "largest_batch"] == 8 and summary.loc[0, "limited_by"] == "search limit"
    assert (run_dir / "maxbatch.png").stat().st_size > 10_000


def test_maxbatch_on_a_cpu_needs_a_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(settings.nvml, "gpu_present", lambda: False)
    assert cli.main(["maxbatch", "--preset", "tiny", "--framework", "jax", "--out", str(tmp_path)]) == 2
    assert "--memory-budget is needed on a CPU" in capsys.readouterr().err
