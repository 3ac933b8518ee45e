"""CI's timing gate (bench/regress/ab_check.py) on the fake backend: the baseline's commit is extracted from a
real git repository, measured beside this checkout in A B / B A pairs, and judged on the pairs
(bench/regress/paired.py, whose statistics are tested here on known numbers); bad baselines are refused."""

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
from bench.regress.paired import ALL_CELLS, all_cells_ratios, paired_stats

TINY = ["--preset", "tiny", "--batch-size", "1", "--iters", "30", "--warmup", "1", "--min-time", "0.01"]
BASE_ONLY_SWITCH = "HGBENCH_TEST_SLOWDOWN_BASE_CODE"  # read only by the committed copy (see make_repo)
CELL = "jax-jit-fp32-b1-forward"
LIMITS = ab_check.GateLimits(threshold=0.05, cell_threshold=0.2, pairs=3)

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
    assert cli.main(["run", *TINY, "--framework", "jax", "--impl", "idiomatic", "--phase", "forward", "--out", str(out),
                     "--no-report"]) == 0
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


def started(run_dir: Path) -> str:
    return str(json.loads((run_dir / "run.json").read_text())["started_utc"])


def test_gate_measures_the_committed_code_in_alternating_pairs_and_passes_when_the_checkout_is_not_slower(
    fake: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    commit = make_repo(tmp_path / "repo")
    baseline = make_baseline(tmp_path / "baseline", commit)
    fake.setenv(BASE_ONLY_SWITCH, "2.0")  # the committed code is 3x slower: the checkout can only look faster
    # 20 ms steps: microsecond steps vary too much from run to run for three pairs to call "faster" every time.
    fake.setenv("HGBENCH_FAKE_FAULTS", "slow@jax")
    code, verdict = ab_check.check(baseline, tmp_path / "out", LIMITS, repo=tmp_path / "repo")
    assert code == 0 and verdict["failures"] == [] and verdict["slower"] == []
    runs = tmp_path / "out" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["base-1", "base-2", "base-3", "new-1", "new-2", "new-3"]
    order = sorted(runs.iterdir(), key=started)  # A B, B A, A B
    assert [p.name for p in order] == ["base-1", "new-1", "new-2", "base-2", "base-3", "new-3"]
    assert all(injected(runs / f"base-{k}") == 2.0 and math.isnan(injected(runs / f"new-{k}")) for k in (1, 2, 3))
    # Pair 1 checks equivalence and gradients and calibrates on both sides; later pairs time the cells alone.
    checks = {p.name: json.loads((p / "run.json").read_text())["settings"]["checks"] for p in runs.iterdir()}
    assert checks == {"base-1": True, "new-1": True, "base-2": False, "new-2": False, "base-3": False, "new-3": False}
    assert verdict["later_pairs_timing_only"] is True
    kinds = set(pd.read_csv(runs / "new-2" / "summary.csv")["kind"])
    assert kinds == {"model"} and "calibration" in set(pd.read_csv(runs / "new-1" / "summary.csv")["kind"])
    judged = {j["name"]: j for j in verdict["paired"]}
    assert set(judged) == {CELL, ALL_CELLS}
    assert judged[CELL]["n_pairs"] == 3 and judged[CELL]["ratio"] < 1 and judged[CELL]["verdict"] == "faster"
    assert json.loads((tmp_path / "out" / "verdict.json").read_text())["base_commit"] == commit
    assert verdict["against_committed"]["invariant_mismatches"] == []


def test_gate_fails_when_the_pairs_show_a_slowdown(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    commit = make_repo(tmp_path / "repo")
    baseline = make_baseline(tmp_path / "baseline", commit)
    fake.setenv("HGBENCH_TEST_SLOWDOWN", "3.0")  # reaches the new runs only: the checkout is 4x slower
    code, verdict = ab_check.check(baseline, tmp_path / "out", LIMITS, repo=tmp_path / "repo")
    assert code == 1
    assert verdict["slower"] == [CELL, ALL_CELLS]
    assert any(f.startswith(f"{ALL_CELLS}: ") and "slower by more than 5%" in f for f in verdict["failures"])
    runs = tmp_path / "out" / "runs"
    assert all(math.isnan(injected(runs / f"base-{k}")) and injected(runs / f"new-{k}") == 3.0 for k in (1, 2, 3))


def test_paired_statistics_on_known_ratios() -> None:
    # Three pairs at 1.10, 1.12, 1.14: geometric mean 1.12, a tight interval, clearly slower than 5%.
    slow = paired_stats("c", [1.10, 1.12, 1.14], threshold=0.05, alpha=0.05)
    assert slow.ratio == pytest.approx((1.10 * 1.12 * 1.14) ** (1 / 3))
    assert slow.ci95_low > 1.05 and slow.ci95_high < 1.2 and slow.p_slower < 0.01 and slow.verdict == "slower"
    # The same mean size with one wild pair: not significant, so not a verdict of slower.
    wild = paired_stats("c", [0.80, 1.00, 1.60], threshold=0.05, alpha=0.05)
    assert wild.ratio > 1.05 and wild.p_slower > 0.05 and wild.verdict == "unchanged"
    # Significant but smaller than the threshold: unchanged; the mirror image: faster.
    assert paired_stats("c", [1.02, 1.03, 1.025], 0.05, 0.05).verdict == "unchanged"
    assert paired_stats("c", [1 / 1.10, 1 / 1.12, 1 / 1.14], 0.05, 0.05).verdict == "faster"
    # Identical pairs: a zero spread makes the sign certain; two pairs are too few to judge.
    same = paired_stats("c", [1.2, 1.2, 1.2], 0.05, 0.05)
    assert same.p_slower == 0.0 and same.ci95_low == pytest.approx(1.2) and same.verdict == "slower"
    assert paired_stats("c", [1.5, 1.5], 0.05, 0.05).verdict == "too_few_pairs"
    with pytest.raises(ValueError, match="finite and positive"):
        paired_stats("c", [1.0, 0.0, 1.0], 0.05, 0.05)
    # All cells: per pair, the geometric mean over cells.
    assert all_cells_ratios({"a": [1.21, 1.0], "b": [1.0, 0.81]}) == pytest.approx([1.1, 0.9])
    with pytest.raises(ValueError, match="different numbers of pairs"):
        all_cells_ratios({"a": [1.0, 1.0], "b": [1.0]})


def test_a_ten_percent_slowdown_of_every_cell_fails_the_overall_test_but_no_cell_test() -> None:
    # Pairs with the spread measured on the 2-core machine (sd of log ratio ~0.05 per cell): every cell
    # 10% slower is below the 20% cell threshold, and well beyond the 5% overall one once cells are averaged.
    per_cell = {"a": [1.05, 1.16, 1.09, 1.12, 1.08], "b": [1.14, 1.04, 1.11, 1.07, 1.13], "c": [1.10, 1.09, 1.15, 1.06, 1.10]}
    judged = {j.name: j for j in ab_check.judge_pairs(per_cell, LIMITS)}
    assert [judged[c].verdict for c in per_cell] == ["unchanged"] * 3
    assert judged[ALL_CELLS].verdict == "slower" and judged[ALL_CELLS].threshold == 0.05
    assert ab_check.pair_order(1) == ("base", "new") and ab_check.pair_order(2) == ("new", "base")


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
        ab_check.check(missing, tmp_path / "out-missing", LIMITS, repo=tmp_path / "repo")
    (tmp_path / "used" / "runs" / "base-1").mkdir(parents=True)
    with pytest.raises(ab_check.ABCheckError, match="already holds base-1"):
        ab_check.check(missing, tmp_path / "used", LIMITS, repo=tmp_path / "repo")
    assert ab_check.main(["--baseline", str(tmp_path / "repo"), "--out", str(tmp_path / "x")]) == 2
    assert "no readable run.json" in capsys.readouterr().err
    assert ab_check.main(["--baseline", str(missing), "--out", str(tmp_path / "y"), "--pairs", "2"]) == 2
    assert "at least 3 pairs" in capsys.readouterr().err


def test_gate_without_the_base_code_warns_and_gates_only_what_needs_no_timing(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_repo(tmp_path / "repo")
    baseline = make_baseline(tmp_path / "baseline", "0" * 40)  # a commit this repository does not have
    code, verdict = ab_check.check(baseline, tmp_path / "out", LIMITS, repo=tmp_path / "repo", if_base_code_missing="warn")
    assert code == 0 and verdict["timing_gated"] is False and verdict["pairs"] == []
    assert "timing is NOT gated" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["new-1"]
    fake.setenv("HGBENCH_FAKE_FAULTS", "crash@jax")  # a failed cell still fails the gate
    code, verdict = ab_check.check(
        baseline, tmp_path / "out2", LIMITS, repo=tmp_path / "repo", if_base_code_missing="warn"
    )
    assert code == 1 and any("cell not ok" in reason for reason in verdict["failures"])


def test_experiment_counts_false_alarms_and_detections(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench.experiments import ab_check_experiment

    # Steps of a few microseconds differ by 20% between two runs of the same code; 20 ms sleeps do not.
    fake.setenv("HGBENCH_FAKE_FAULTS", "slow@jax")
    commit = make_repo(tmp_path / "repo")
    baseline = make_baseline(tmp_path / "baseline", commit)
    out = tmp_path / "experiment"
    argv = ["--baseline", str(baseline), "--gates", "1", "--slowdowns", "3", "--pairs", "3", "--out", str(out)]
    assert ab_check_experiment.main(argv, repo=tmp_path / "repo") == 0
    gates = pd.read_csv(out / "gates.csv").set_index("kind")
    assert not gates.loc["same_code", "failed"] and gates.loc["same_code", "all_cells_ratio"] < 1.05
    assert gates.loc["slowdown", "failed"] and gates.loc["slowdown", "slower"] == f"{CELL};{ALL_CELLS}"
    assert gates.loc["slowdown", "all_cells_ratio"] > 3
    assert "HGBENCH_TEST_SLOWDOWN" not in os.environ  # the switch does not leak out of the experiment
    assert ab_check_experiment.main(argv, repo=tmp_path / "repo") == 2  # --out is no longer empty
    assert ab_check_experiment.main([*argv, "--more"], repo=tmp_path / "repo") == 0  # evidence grows over sessions
    assert pd.read_csv(out / "gates.csv")["gate"].tolist() == [1, 1, 2, 2]
    # Judged again from the stored pairs: the same verdicts under the same rule, none at an impossible size.
    assert ab_check_experiment.main(["--out", str(out), "--rejudge"]) == 0
    again = pd.read_csv(out / "gates-rejudged.csv")
    assert again["rejudged_failed"].tolist() == again["measured_failed"].tolist() == [False, True, False, True]
    assert ab_check_experiment.main(["--out", str(out), "--rejudge", "--threshold", "500%", "--cell-threshold", "500%"]) == 0
    assert not pd.read_csv(out / "gates-rejudged.csv")["rejudged_failed"].any()
    fake.setenv("HGBENCH_FAKE_FAULTS", "")
    assert ab_check_experiment.main([*argv[:2], "--gates", "0", "--out", str(tmp_path / "x")]) == 2


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
