"""CI's timing gate (bench/ab_check.py) on the fake backend: the baseline's commit is extracted from a real
git repository, measured beside this checkout, and judged; bad baselines are refused with exit 2."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bench import cli
from bench.core.paths import REPO_ROOT
from bench.regress import ab_check

TINY = ["--preset", "tiny", "--batch-size", "1", "--iters", "30", "--warmup", "1", "--min-time", "0.01"]
BASE_ONLY_SWITCH = "HGBENCH_TEST_SLOWDOWN_BASE_CODE"  # read only by the committed copy (see make_repo)

# The gate takes the baseline's code from git; without a git binary there is nothing to test it with.
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Workers load tests/fake_backend.py, which the extracted base code (bench/ and impls/ only) finds
    through PYTHONPATH."""
    monkeypatch.setenv("HGBENCH_BACKEND_OVERRIDE", "tests.fake_backend")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    for name in ("HGBENCH_FAKE_FAULTS", "HGBENCH_TEST_SLOWDOWN", BASE_ONLY_SWITCH):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def make_repo(root: Path) -> str:
    """A git repository whose one commit holds this checkout's bench/ and impls/, except that its worker
    reads the slowdown switch under another name: a run slowed by that name ran the committed code."""
    root.mkdir()
    for package in ("bench", "impls"):
        shutil.copytree(REPO_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    worker = root / "bench" / "engine" / "protocol.py"
    text = worker.read_text()
    assert 'SLOWDOWN_ENV = "HGBENCH_TEST_SLOWDOWN"' in text
    worker.write_text(text.replace('SLOWDOWN_ENV = "HGBENCH_TEST_SLOWDOWN"', f'SLOWDOWN_ENV = "{BASE_ONLY_SWITCH}"'))
    git = [
        "git",
        "-C",
        str(root),
        "-c",
        "user.name=test",
        "-c",
        "user.email=test@example.invalid",
        "-c",
        "commit.gpgsign=false",
    ]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "baseline code"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def make_baseline(out: Path, commit: str | None, dirty: bool | None = False) -> Path:
    """A one-cell run (fake jax, forward) whose run.json names `commit` as the code that made it."""
    assert cli.main(["run", *TINY, "--framework", "jax", "--phase", "forward", "--out", str(out), "--no-report"]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    record = json.loads((run_dir / "run.json").read_text())
    record["environment"]["git"] = {"commit": commit, "dirty": dirty}
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def injected(run_dir: Path) -> float:
    """The run's injected_slowdown (empty, read as NaN, where the switch was off)."""
    return float(
        pd.read_csv(run_dir / "summary.csv").set_index("cell_id").loc["jax-jit-fp32-b1-forward", "injected_slowdown"]
    )


def test_gate_measures_the_committed_code_and_passes_when_the_checkout_is_not_slower(
    fake: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    commit = make_repo(tmp_path / "repo")
    baseline = make_baseline(tmp_path / "baseline", commit)
    fake.setenv(BASE_ONLY_SWITCH, "2.0")  # the committed code is 3x slower: the checkout can only look faster
    code, verdict = ab_check.check(baseline, tmp_path / "out", 0.2, repo=tmp_path / "repo")
    assert code == 0 and verdict["failures"] == []
    assert len(verdict["pairs"]) == 1  # pair 1 flagged nothing, so no second pair was measured
    runs = tmp_path / "out" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["base-1", "new-1"]
    assert injected(runs / "base-1") == 2.0 and math.isnan(injected(runs / "new-1"))
    assert verdict["pairs"][0]["ratios"]["jax-jit-fp32-b1-forward"] < 1
    assert json.loads((tmp_path / "out" / "verdict.json").read_text())["base_commit"] == commit
    assert verdict["against_committed"]["invariant_mismatches"] == []


def test_gate_fails_when_a_slowdown_shows_in_both_pairs(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    commit = make_repo(tmp_path / "repo")
    baseline = make_baseline(tmp_path / "baseline", commit)
    fake.setenv("HGBENCH_TEST_SLOWDOWN", "3.0")  # reaches the new runs only: the checkout is 4x slower
    code, verdict = ab_check.check(baseline, tmp_path / "out", 0.2, repo=tmp_path / "repo")
    assert code == 1
    assert verdict["confirmed_regressions"] == ["jax-jit-fp32-b1-forward"]
    assert [p["regressions"] for p in verdict["pairs"]] == [["jax-jit-fp32-b1-forward"]] * 2
    runs = tmp_path / "out" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["base-1", "base-2", "new-1", "new-2"]
    assert math.isnan(injected(runs / "base-2")) and injected(runs / "new-2") == 3.0


def test_gate_refuses_a_baseline_whose_code_is_unknown(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    commit = make_repo(tmp_path / "repo")
    for name, (recorded, dirty), expected in (
        ("nogit", (None, None), "records no git commit"),
        ("dirty", (commit, True), "uncommitted changes"),
    ):
        baseline = make_baseline(tmp_path / name, recorded, dirty)
        assert ab_check.main(["--baseline", str(baseline), "--out", str(tmp_path / f"out-{name}")]) == 2
        assert expected in capsys.readouterr().err
    missing = make_baseline(tmp_path / "missing", "0" * 40)
    with pytest.raises(ab_check.ABCheckError, match="is not in the git repository"):
        ab_check.check(missing, tmp_path / "out-missing", 0.2, repo=tmp_path / "repo")
    (tmp_path / "used" / "runs" / "base-1").mkdir(parents=True)
    with pytest.raises(ab_check.ABCheckError, match="already holds base-1"):
        ab_check.check(missing, tmp_path / "used", 0.2, repo=tmp_path / "repo")
    assert ab_check.main(["--baseline", str(tmp_path / "repo"), "--out", str(tmp_path / "x")]) == 2
    assert "no readable run.json" in capsys.readouterr().err


def test_gate_without_the_base_code_warns_and_gates_only_what_needs_no_timing(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_repo(tmp_path / "repo")
    baseline = make_baseline(tmp_path / "baseline", "0" * 40)  # a commit this repository does not have
    code, verdict = ab_check.check(baseline, tmp_path / "out", 0.2, repo=tmp_path / "repo", if_base_code_missing="warn")
    assert code == 0 and verdict["timing_gated"] is False and verdict["pairs"] == []
    assert "timing is NOT gated" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["new-1"]
    fake.setenv("HGBENCH_FAKE_FAULTS", "crash@jax")  # a failed cell still fails the gate
    code, verdict = ab_check.check(
        baseline, tmp_path / "out2", 0.2, repo=tmp_path / "repo", if_base_code_missing="warn"
    )
    assert code == 1 and any("cell not ok" in reason for reason in verdict["failures"])


def test_experiment_counts_false_alarms_and_detections(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench.experiments import ab_check_experiment

    # Steps of a few microseconds differ by 20% between two runs of the same code; 20 ms sleeps do not.
    fake.setenv("HGBENCH_FAKE_FAULTS", "slow@jax")
    commit = make_repo(tmp_path / "repo")
    baseline = make_baseline(tmp_path / "baseline", commit)
    out = tmp_path / "experiment"
    argv = ["--baseline", str(baseline), "--rounds", "1", "--slowdown", "3", "--out", str(out)]
    assert ab_check_experiment.main(argv, repo=tmp_path / "repo") == 0
    rounds = pd.read_csv(out / "rounds.csv").set_index("kind")
    assert not rounds.loc["same_code", "failed"]
    assert rounds.loc["slowdown", "failed"] and rounds.loc["slowdown", "confirmed"] == 1
    assert "HGBENCH_TEST_SLOWDOWN" not in os.environ  # the switch does not leak out of the experiment
    assert ab_check_experiment.main(argv, repo=tmp_path / "repo") == 2  # --out is no longer empty


def test_gate_fails_a_new_run_that_lacks_cells_or_did_not_complete() -> None:
    from bench.regress.compare import Comparison

    whole = Comparison("base", "new", "latency_ms", 0.2, 0.01, False)
    assert ab_check._incomplete(whole, "pair 1") == []
    partial = Comparison("base", "new", "latency_ms", 0.2, 0.01, False, new_status="interrupted",
                         missing_in_new=["jax-jit-fp32-b1-forward"])  # fmt: skip
    assert ab_check._incomplete(partial, "pair 1") == [
        "pair 1: new run is interrupted, not complete",
        "pair 1: new run: cell missing: jax-jit-fp32-b1-forward",
    ]
