"""`bench compare`: the statistics on hand-built samples, bad inputs, exit codes, one-sided cells, --normalize.

Run folders are built by hand with pandas (no framework runs), so the whole file takes a few seconds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import impls
from bench.cli import main
from bench.core.columns import SAMPLE_COLUMNS, SUMMARY_COLUMNS
from bench.core.stats import ratio_of_medians
from bench.regress.compare import CompareError, compare_runs, parse_threshold, verdict

FWD = "torch-eager-fp32-b1-forward"
BWD = "torch-eager-fp32-b1-forward_backward"
CAL = "torch-conv_benchmark-fp32-b1-conv3x3"


def _noise(n: int, seed: int, center_ms: float = 10.0, spread: float = 0.03) -> np.ndarray:
    """n latencies in ms around `center_ms` with a few percent of multiplicative noise."""
    rng = np.random.default_rng(seed)
    return center_ms * np.exp(rng.normal(0.0, spread, n))


def write_run(
    root: Path,
    name: str,
    cells: Mapping[str, Sequence[float]],
    *,
    calibration_ms: Sequence[float] | None = None,
    config: Mapping[str, Any] | None = None,
    row_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    warnings: Sequence[str] = (),
    status: str | None = None,
) -> Path:
    """A run folder as `bench run` writes it: model cells `torch-eager-fp32-b1-<phase>` with samples in ms."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = {**impls.PRESETS["tiny"].to_dict(), **(config or {})}
    all_cells = {**({CAL: calibration_ms} if calibration_ms is not None else {}), **cells}
    rows, samples = [], []
    for cell_id, values_ms in all_cells.items():
        framework, execution, precision, batch, phase = cell_id.split("-")
        kind = "calibration" if execution.endswith("_benchmark") else "model"
        key = {"cell_id": cell_id, "kind": kind, "framework": framework, "execution": execution,
               "precision": precision, "batch_size": int(batch[1:]), "phase": phase}  # fmt: skip
        pooled = np.concatenate([np.ravel(v) for v in values_ms]) if isinstance(values_ms, list) else values_ms
        row = {**key, "device": "cpu", "status": "ok", "n_samples": len(pooled),
               "latency_ms_median": float(np.median(pooled)), "first_call_ms": 100.0,
               "gflop_per_step": 0.25 if phase == "forward_backward" else 0.1}  # fmt: skip
        if kind == "model":
            row.update(equivalence_max_rel_err=5e-7, equivalent=True)
        row.update((row_overrides or {}).get(cell_id, {}))
        rows.append(row)
        rounds = values_ms if isinstance(values_ms, list) and values_ms and np.ndim(values_ms[0]) else [values_ms]
        samples += [{**key, "round": r, "iteration": i, "latency_ns": round(v * 1e6)}
                    for r, values in enumerate(rounds, start=1) for i, v in enumerate(values)]  # fmt: skip
    pd.DataFrame(rows, columns=SUMMARY_COLUMNS).to_csv(run_dir / "summary.csv", index=False)
    pd.DataFrame(samples, columns=SAMPLE_COLUMNS).to_csv(run_dir / "samples.csv", index=False)
    record = {"run_id": name, "settings": {"config": cfg, "device": "cpu"}, "warnings": list(warnings)}
    if status is not None:
        record["status"] = status
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


# ---------------------------------------------------------------- statistics on hand-built samples


def test_ratio_of_medians_exactly_scaled_samples_give_that_ratio_and_slower() -> None:
    base = _noise(30, seed=1)
    stats = ratio_of_medians(base, base * 1.3)
    assert stats.ratio == pytest.approx(1.3, rel=1e-12)
    assert 1.0 < stats.ci95_low <= 1.3 <= stats.ci95_high
    assert stats.p_value < 1e-6
    assert verdict(stats, threshold=0.10) == "slower"


def test_ratio_of_medians_identical_distributions_are_unchanged() -> None:
    stats = ratio_of_medians(_noise(30, seed=2), _noise(30, seed=3))
    assert stats.ci95_low < 1.0 < stats.ci95_high
    assert stats.p_value > 0.01
    assert verdict(stats, threshold=0.10) == "unchanged"


def test_ratio_of_medians_disjoint_faster_distribution_is_faster() -> None:
    base, new = np.linspace(10.0, 11.0, 25), np.linspace(5.0, 6.0, 25)  # every new sample below every base one
    stats = ratio_of_medians(base, new)
    assert stats.ratio == pytest.approx(5.5 / 10.5)
    assert stats.ci95_high < 1.0
    assert verdict(stats, threshold=0.10) == "faster"


def test_verdict_significant_but_below_threshold_is_unchanged() -> None:
    base, new = np.linspace(10.0, 10.1, 30), np.linspace(10.5, 10.6, 30)  # disjoint, but only 5% slower
    stats = ratio_of_medians(base, new)
    assert stats.ci95_low > 1.0 and stats.p_value < 0.01
    assert verdict(stats, threshold=0.10) == "unchanged"
    assert verdict(stats, threshold=0.03) == "slower"


def test_ratio_of_medians_is_deterministic_for_a_fixed_seed() -> None:
    base, new = _noise(40, seed=4), _noise(40, seed=5, center_ms=11.0)
    assert ratio_of_medians(base, new) == ratio_of_medians(base, new)


def test_ratio_of_medians_constant_equal_samples_give_ratio_one_and_p_one() -> None:
    stats = ratio_of_medians([5.0] * 10, [5.0] * 10)
    assert (stats.ratio, stats.ci95_low, stats.ci95_high, stats.p_value) == (1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize(("text", "value"), [("10%", 0.10), ("0.1", 0.1), ("25%", 0.25), ("0", 0.0)])
def test_parse_threshold_accepts_percent_and_fraction(text: str, value: float) -> None:
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["ten", "-5%", "", "%"])
def test_parse_threshold_rejects_garbage_with_the_fix(text: str) -> None:
    with pytest.raises(CompareError, match=r"--threshold must be a fraction or a percentage such as 0.1 or 10%"):
        parse_threshold(text)


# ---------------------------------------------------------------- whole runs and exit codes


def test_compare_cli_same_distribution_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 10), BWD: _noise(30, 11, 30.0)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 12), BWD: _noise(30, 13, 30.0)})
    assert main(["compare", str(base), str(new)]) == 0
    out = capsys.readouterr().out
    assert "no significant regression" in out and FWD in out


def test_compare_cli_thirty_percent_slower_cell_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fwd = _noise(30, 20)
    base = write_run(tmp_path, "base", {FWD: fwd, BWD: _noise(30, 21, 30.0)})
    new = write_run(tmp_path, "new", {FWD: fwd * 1.3, BWD: _noise(30, 22, 30.0)})
    json_path, csv_path = tmp_path / "cmp.json", tmp_path / "cmp.csv"
    assert main(["compare", str(base), str(new), "--json", str(json_path), "--csv", str(csv_path)]) == 1
    assert "1 cell(s) significantly slower" in capsys.readouterr().out
    record = json.loads(json_path.read_text())
    assert record["regressions"] == [FWD] and record["exit_code"] == 1
    table = pd.read_csv(csv_path).set_index("cell_id")
    assert table.loc[FWD, "verdict"] == "slower" and table.loc[BWD, "verdict"] == "unchanged"
    assert table.loc[FWD, "ratio"] == pytest.approx(1.3, rel=1e-6)


def test_compare_cli_threshold_above_the_slowdown_exits_0(tmp_path: Path) -> None:
    fwd = _noise(30, 23)
    base = write_run(tmp_path, "base", {FWD: fwd})
    new = write_run(tmp_path, "new", {FWD: fwd * 1.3})
    assert main(["compare", str(base), str(new), "--threshold", "0.5"]) == 0


def test_compare_runs_cells_on_one_side_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 30), BWD: _noise(30, 31)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 32), "torch-eager-fp32-b2-forward": _noise(30, 33)})
    comparison = compare_runs(base, new)
    status = {c.cell_id: c.status for c in comparison.cells}
    assert status == {FWD: "compared", BWD: "base_only", "torch-eager-fp32-b2-forward": "new_only"}
    assert main(["compare", str(base), str(new), "--allow-partial"]) == 0
    out = capsys.readouterr().out
    assert f"base only: {BWD}" in out and "new only: torch-eager-fp32-b2-forward" in out
    assert f"partial (allowed): {BWD}: ok in the base, missing from the new run" in out
    assert "no significant regression among the cells both runs measured" in out


def test_compare_cell_ok_in_base_but_missing_in_new_exits_1_naming_it(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 30), BWD: _noise(30, 31)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 32)})
    assert main(["compare", str(base), str(new)]) == 1
    out = capsys.readouterr().out
    assert f"incomplete new run: {BWD}: ok in the base, missing from the new run" in out
    assert "no significant regression" not in out and "--allow-partial" in out


def test_compare_cell_failed_in_new_exits_1_with_its_error_unless_partial_is_allowed(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 34), BWD: _noise(30, 35)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 36), BWD: _noise(30, 37)},
                    row_overrides={BWD: {"status": "failed", "error": "Traceback\nValueError: boom"}})  # fmt: skip
    comparison = compare_runs(base, new)
    assert comparison.exit_code == 1 and comparison.regressions == []
    assert comparison.incomplete == [f"{BWD}: ok in the base, failed (ValueError: boom) in the new run"]
    assert main(["compare", str(base), str(new), "--allow-partial"]) == 0
    assert "partial (allowed)" in capsys.readouterr().out


def test_compare_cell_failed_in_both_runs_is_not_an_incomplete_new_run(tmp_path: Path) -> None:
    overrides = {BWD: {"status": "oom"}}
    base = write_run(tmp_path, "base", {FWD: _noise(30, 38), BWD: _noise(30, 39)}, row_overrides=overrides)
    new = write_run(tmp_path, "new", {FWD: _noise(30, 38), BWD: _noise(30, 39)}, row_overrides=overrides)
    assert compare_runs(base, new).exit_code == 0


@pytest.mark.parametrize("status", ["interrupted", "running"])
def test_compare_new_run_not_complete_exits_1_saying_so(tmp_path: Path, capsys, status: str) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 50)}, status="complete")
    new = write_run(tmp_path, "new", {FWD: _noise(30, 51)}, status=status)
    assert main(["compare", str(base), str(new)]) == 1
    assert f"incomplete new run: the new run is {status} (run.json status), not complete" in capsys.readouterr().out
    assert main(["compare", str(base), str(new), "--allow-partial"]) == 0


def test_compare_new_run_with_a_header_only_summary_exits_1(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 52)})
    new = write_run(tmp_path, "new", {})
    assert main(["compare", str(base), str(new)]) == 1
    assert f"{FWD}: ok in the base, missing from the new run" in capsys.readouterr().out


def test_compare_identical_runs_with_summary_cut_mid_line_exits_2_naming_the_file(tmp_path: Path, capsys) -> None:
    cells = {FWD: _noise(30, 53), BWD: _noise(30, 54)}
    base = write_run(tmp_path, "base", cells, calibration_ms=_noise(30, 55, 2.0))
    new = write_run(tmp_path, "new", cells, calibration_ms=_noise(30, 55, 2.0))
    text = (new / "summary.csv").read_text()
    (new / "summary.csv").write_text(text[: len(text) - 40])  # the last row loses its end
    assert main(["compare", str(base), str(new), "--normalize"]) == 2
    assert "summary.csv ends mid-line: the file was cut short" in _one_line_error(capsys)


def test_compare_runs_failed_cell_is_not_compared(tmp_path: Path) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 34)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 35)}, row_overrides={FWD: {"status": "timeout"}})
    (cell,) = compare_runs(base, new).cells
    assert cell.status == "not_ok" and "timeout" in cell.note and cell.verdict == ""


def test_compare_runs_flop_mismatch_is_an_invariant_failure_exit_1(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 40)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 41)}, row_overrides={FWD: {"gflop_per_step": 0.2}})
    assert main(["compare", str(base), str(new)]) == 1
    assert "invariant mismatch" in capsys.readouterr().out


def test_compare_runs_equivalence_drift_beyond_tolerance_is_listed(tmp_path: Path) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 42)})
    small = write_run(tmp_path, "small", {FWD: _noise(30, 43)}, row_overrides={FWD: {"equivalence_max_rel_err": 6e-7}})
    large = write_run(tmp_path, "large", {FWD: _noise(30, 44)}, row_overrides={FWD: {"equivalence_max_rel_err": 2e-3}})
    assert compare_runs(base, small).invariant_mismatches == []
    (problem,) = compare_runs(base, large).invariant_mismatches
    assert "equivalence_max_rel_err" in problem


def test_compare_runs_first_call_metric_uses_the_threshold_alone(tmp_path: Path) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 45)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 45)}, row_overrides={FWD: {"first_call_ms": 150.0}})
    (cell,) = compare_runs(base, new, metric="first_call_ms").cells
    assert cell.ratio == pytest.approx(1.5) and cell.verdict == "slower" and "threshold only" in cell.note


# ---------------------------------------------------------------- --normalize


def test_compare_normalize_cancels_a_uniformly_slower_machine(tmp_path: Path, capsys) -> None:
    fwd, cal = _noise(30, 50), _noise(30, 51, center_ms=1.0)
    base = write_run(tmp_path, "base", {FWD: fwd}, calibration_ms=cal)
    new = write_run(tmp_path, "slow_machine", {FWD: fwd * 1.5}, calibration_ms=cal * 1.5)  # everything 1.5x
    assert main(["compare", str(base), str(new)]) == 1  # raw: a 50% slowdown
    capsys.readouterr()
    assert main(["compare", str(base), str(new), "--normalize"]) == 0
    out = capsys.readouterr().out
    assert "machine ratio 1.500" in out and "reference conv new/base per framework: torch 1.500" in out
    (cell,) = compare_runs(base, new, normalize=True).cells
    assert cell.ratio == pytest.approx(1.0, abs=1e-6)


def test_compare_normalize_still_flags_a_model_only_slowdown(tmp_path: Path) -> None:
    fwd, cal = _noise(30, 52), _noise(30, 53, center_ms=1.0)
    base = write_run(tmp_path, "base", {FWD: fwd}, calibration_ms=cal)
    new = write_run(tmp_path, "new", {FWD: fwd * 1.3}, calibration_ms=cal)
    comparison = compare_runs(base, new, normalize=True)
    assert comparison.exit_code == 1 and comparison.cells[0].verdict == "slower"


def test_compare_normalize_without_calibration_row_reports_the_cell(tmp_path: Path) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 54)}, calibration_ms=_noise(30, 55, 1.0))
    new = write_run(tmp_path, "new", {FWD: _noise(30, 56)})
    (cell,) = compare_runs(base, new, normalize=True).cells
    assert cell.status == "no_calibration" and "both runs" in cell.note


def test_compare_normalize_uses_the_median_machine_ratio_so_one_bimodal_yardstick_is_outvoted(tmp_path: Path) -> None:
    fwd = _noise(30, 57)
    refs = {f"{fw}-conv_benchmark-fp32-b1-reference_conv": _noise(30, 58 + i, 2.0) for i, fw in enumerate(("torch", "tensorflow", "jax"))}
    jax_ref = "jax-conv_benchmark-fp32-b1-reference_conv"
    base = write_run(tmp_path, "base", {**refs, FWD: fwd})
    # Same machine speed for torch and TensorFlow; JAX's yardstick alone came out 1.7x slower.
    new = write_run(tmp_path, "new", {**refs, jax_ref: refs[jax_ref] * 1.7, FWD: fwd * 1.3})
    comparison = compare_runs(base, new, normalize=True)
    assert comparison.calibration_ratios["jax"] == pytest.approx(1.7)
    assert comparison.machine_ratio == pytest.approx(1.0)
    (cell,) = comparison.cells
    assert cell.ratio == pytest.approx(1.3, rel=1e-6) and cell.verdict == "slower"


# ---------------------------------------------------------------- bad input: exit 2, one line, no traceback


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_compare_cli_missing_folder_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 60)})
    assert main(["compare", str(base), str(tmp_path / "nope")]) == 2
    assert "nope" in _one_line_error(capsys)


def test_compare_cli_foreign_csv_exits_2_naming_the_missing_columns(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 61)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 62)})
    pd.DataFrame({"name": ["a"], "value": [1]}).to_csv(new / "summary.csv", index=False)
    assert main(["compare", str(base), str(new)]) == 2
    assert "summary.csv is not an hgbench results file (missing columns cell_id" in _one_line_error(capsys)


def test_compare_cli_malformed_samples_exits_2(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 63)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 64)})
    (new / "samples.csv").write_text("cell_id,latency_ns\nx,fast\n")
    assert main(["compare", str(base), str(new)]) == 2
    assert "latency_ns must be positive integers, got 'fast'" in _one_line_error(capsys)


def test_compare_cli_binary_csv_exits_2(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 65)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 66)})
    (new / "summary.csv").write_bytes(b"\xff\xfe\x00garbage\x00\x81")
    assert main(["compare", str(base), str(new)]) == 2
    assert "summary.csv" in _one_line_error(capsys)


def test_compare_cli_mismatched_config_exits_2_naming_the_field(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 67)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 68)}, config={"num_stacks": 3})
    assert main(["compare", str(base), str(new)]) == 2
    assert "config num_stacks is 2" in _one_line_error(capsys)


def test_compare_cli_unknown_metric_exits_2(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 69)})
    assert main(["compare", str(base), str(base), "--metric", "throughput"]) == 2
    assert "--metric must be one of latency_ms, first_call_ms, got 'throughput'" in _one_line_error(capsys)


def test_compare_cli_json_into_missing_folder_exits_2_before_comparing(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 70)})
    assert main(["compare", str(base), str(base), "--json", str(tmp_path / "no" / "such" / "x.json")]) == 2
    assert "--json" in _one_line_error(capsys)


@pytest.mark.parametrize(("flag", "target", "message"), [
    ("--json", "{tmp}", "is a folder; give a file name"),
    ("--csv", "{tmp}/base/summary.csv/x.csv", "summary.csv is a file, not a folder; give a path in a folder"),
    ("--json", "", "--json is empty; give a file name"),
])  # fmt: skip
def test_compare_cli_unwritable_output_file_exits_2_with_one_line(tmp_path: Path, capsys, flag: str, target: str,
                                                                  message: str) -> None:  # fmt: skip
    base = write_run(tmp_path, "base", {FWD: _noise(30, 70)})
    assert main(["compare", str(base), str(base), flag, target.format(tmp=tmp_path)]) == 2
    assert message in _one_line_error(capsys)


def test_compare_cli_writes_json_and_csv_with_the_verdict(tmp_path: Path) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 73), BWD: _noise(30, 74)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 75)})
    code = main(["compare", str(base), str(new), "--json", str(tmp_path / "c.json"), "--csv", str(tmp_path / "c.csv")])
    record = json.loads((tmp_path / "c.json").read_text())
    assert code == 1 and record["exit_code"] == 1 and record["missing_in_new"] == [BWD]
    assert set(pd.read_csv(tmp_path / "c.csv")["cell_id"]) == {FWD, BWD}


def test_compare_cli_shows_a_runs_busy_machine_warning(tmp_path: Path, capsys) -> None:
    busy = "the machine is busy (1-minute load 4.1 on 2 cores); timings will be slow and noisy"
    base = write_run(tmp_path, "base", {FWD: _noise(30, 71)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 72)}, warnings=[busy])
    assert main(["compare", str(base), str(new)]) == 0
    assert f"warning: new run: {busy}" in capsys.readouterr().out


# ---------------------------------------------------------------- rounds: the process as a level


def _rounds(seed: int, offsets: Sequence[float], center_ms: float = 10.0, n: int = 20) -> list[np.ndarray]:
    """One round per offset: latencies around center_ms * (1 + offset), 1% within-round noise."""
    return [_noise(n, seed + i, center_ms * (1.0 + off), spread=0.01) for i, off in enumerate(offsets)]


def test_compare_of_rounds_does_not_flag_same_code_with_process_noise() -> None:
    """Same code, 6% process-to-process noise: one round each would look like a confident 1.12x; with five
    rounds a side the interval knows the noise and the verdict is unchanged."""
    base = _rounds(10, [-0.06, 0.0, 0.06, -0.03, 0.03])
    new = _rounds(20, [0.06, 0.03, 0.0, 0.06, -0.03])
    single = ratio_of_medians(base[0], new[0])
    assert single.ci_level == "within-process" and verdict(single, 0.10) == "slower"  # the false alarm of one round
    stats = ratio_of_medians(base, new)
    assert stats.ci_level == "rounds" and stats.rounds_base == 5 and stats.rounds_new == 5
    assert stats.ci95_low < 1.0 < stats.ci95_high
    assert verdict(stats, 0.10) == "unchanged"


def test_compare_of_rounds_flags_a_real_slowdown_beyond_the_process_noise() -> None:
    offsets = [-0.03, 0.0, 0.03, -0.015, 0.015]
    base, new = _rounds(30, offsets), _rounds(40, offsets, center_ms=12.5)  # 1.25x slower
    stats = ratio_of_medians(base, new)
    assert stats.ratio == pytest.approx(1.25, rel=0.03)
    assert stats.ci95_low > 1.0
    assert verdict(stats, 0.10) == "slower"


def test_compare_cli_reads_rounds_and_labels_one_round_cells(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path, "base", {FWD: _rounds(50, [0.0, 0.02, -0.02]), BWD: _noise(30, 51)})
    new = write_run(tmp_path, "new", {FWD: _rounds(60, [0.01, -0.01, 0.0]), BWD: _noise(30, 61)})
    comparison = compare_runs(base, new)
    cells = {c.cell_id: c for c in comparison.cells}
    assert (cells[FWD].rounds_base, cells[FWD].rounds_new, cells[FWD].ci_level) == (3, 3, "rounds")
    assert cells[BWD].ci_level == "within-process" and "within-process interval only" in cells[BWD].note


# ---------------------------------------------------------------- devices


def test_compare_flags_a_cell_that_ran_on_another_device(tmp_path: Path) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 71)})
    new = write_run(tmp_path, "new", {FWD: _noise(30, 72)}, row_overrides={FWD: {"device": "gpu"}})
    comparison = compare_runs(base, new)
    assert comparison.exit_code == 1
    assert any("ran on cpu (base) but on gpu (new)" in m for m in comparison.invariant_mismatches)


def test_compare_refuses_runs_on_different_gpu_models(tmp_path: Path) -> None:
    runs = []
    for name, gpu in (("base", "NVIDIA H100"), ("new", "NVIDIA H200")):
        run_dir = write_run(tmp_path, name, {FWD: _noise(30, 73)})
        record = json.loads((run_dir / "run.json").read_text())
        record["settings"]["device"] = "gpu"
        record["environment"] = {"gpus": [{"name": gpu}]}
        (run_dir / "run.json").write_text(json.dumps(record))
        runs.append(run_dir)
    with pytest.raises(CompareError, match=r"the runs are on different GPUs: NVIDIA H100 in .* but NVIDIA H200"):
        compare_runs(*runs)


def _on_nodes(run_dir: Path, envs: Mapping[str, Mapping[str, Any]], placed: Mapping[str, str], device: str = "cpu") -> Path:
    """Make a hand-built run one of a Ray cluster: run.json `nodes`, and each row's node_id (cell -> node)."""
    record = json.loads((run_dir / "run.json").read_text())
    record.update(executor="ray", nodes={node: dict(env) for node, env in envs.items()})
    record["settings"]["device"] = device
    (run_dir / "run.json").write_text(json.dumps(record))
    table = pd.read_csv(run_dir / "summary.csv")
    table["node_id"] = table["cell_id"].map(placed)
    table["host"] = table["node_id"].map(lambda node: envs[node]["host"])
    table["device"] = device
    table.to_csv(run_dir / "summary.csv", index=False)
    return run_dir


def _env(host: str, cpu: str = "AMD EPYC 7B13", gpus: Sequence[str] = (), torch: str = "2.13.0") -> dict[str, Any]:
    return {"host": host, "cpu_model": cpu, "cpu_cores_usable": 2, "python": "3.11.7",
            "gpus": [{"name": g} for g in gpus], "packages": {"torch": torch, "numpy": "2.4.6"}}  # fmt: skip


def test_compare_warns_about_cells_measured_on_different_node_types(tmp_path: Path) -> None:
    cells = {FWD: _noise(30, 80), BWD: _noise(30, 81, center_ms=20.0)}
    base = _on_nodes(write_run(tmp_path, "base", cells), {"n1": _env("a")}, {FWD: "n1", BWD: "n1"})
    new = _on_nodes(write_run(tmp_path, "new", {FWD: _noise(30, 82), BWD: _noise(30, 83, center_ms=20.0)}),
                    {"n2": _env("b", cpu="Intel Xeon 8481C", torch="2.14.0"), "n3": _env("c")}, {FWD: "n2", BWD: "n3"})  # fmt: skip
    comparison = compare_runs(base, new)
    assert comparison.exit_code == 0 and comparison.invariant_mismatches == []
    (difference,) = comparison.node_differences
    assert comparison.node_differences[difference] == [FWD]  # BWD ran on a node of the base's type
    assert difference == "cpu_model 'AMD EPYC 7B13' vs 'Intel Xeon 8481C'; torch 2.13.0 vs 2.14.0"
    assert any(w.startswith(f"1 cell(s) ran on different node types in the two runs ({difference}), e.g. {FWD}")
               for w in comparison.warnings)  # fmt: skip


def test_compare_treats_a_cell_measured_on_another_gpu_model_as_an_invariant_mismatch(tmp_path: Path) -> None:
    cells = {FWD: _noise(30, 84), BWD: _noise(30, 85, center_ms=20.0)}
    base = _on_nodes(write_run(tmp_path, "base", cells), {"n1": _env("a", gpus=["NVIDIA H100"])},
                     {FWD: "n1", BWD: "n1"}, device="gpu")  # fmt: skip
    new = _on_nodes(write_run(tmp_path, "new", cells),
                    {"n2": _env("b", gpus=["NVIDIA H100"]), "n3": _env("c", gpus=["NVIDIA H200"])},
                    {FWD: "n3", BWD: "n2"}, device="gpu")  # fmt: skip
    comparison = compare_runs(base, new)  # the runs share a GPU model: compared, cell by cell
    assert comparison.exit_code == 1
    (mismatch,) = comparison.invariant_mismatches
    assert mismatch.startswith(f"{FWD}: ran on NVIDIA H100 (base, host a) but on NVIDIA H200 (new, host c)")


def test_compare_reads_runs_written_before_rows_named_their_node(tmp_path: Path) -> None:
    base = write_run(tmp_path, "base", {FWD: _noise(30, 86)})
    table = pd.read_csv(base / "summary.csv").drop(columns=["host", "node_id"])  # an older run's columns
    table.to_csv(base / "summary.csv", index=False)
    new = write_run(tmp_path, "new", {FWD: _noise(30, 87)})
    comparison = compare_runs(base, new)
    assert comparison.exit_code == 0 and comparison.node_differences == {}


# ---------------------------------------------------------------- one-round cells judged together; rounds, Bonferroni


def _cells(n: int) -> list[str]:
    """n distinct one-device cell ids (batch sizes 1..n of the torch eager forward cell)."""
    return [f"torch-eager-fp32-b{i}-forward" for i in range(1, n + 1)]


def test_one_round_cells_with_process_noise_alone_are_not_flagged_but_shown(tmp_path: Path, capsys) -> None:
    """Six one-round cells of the same code, each new process 0.8x-1.25x of its base (process noise, as
    measured on this machine): several cells look confidently slower one by one, the run level does not."""
    offsets = [0.25, 1 / 0.8 - 1, 0.2, -0.2, 1 / 1.25 - 1, 0.0]
    ids = _cells(len(offsets))
    base = write_run(tmp_path, "base", {c: _noise(30, 100 + i, spread=0.01) for i, c in enumerate(ids)})
    new = write_run(tmp_path, "new", {c: _noise(30, 200 + i, 10.0 * (1 + off), spread=0.01)
                                      for i, (c, off) in enumerate(zip(ids, offsets, strict=True))})  # fmt: skip
    comparison = compare_runs(base, new)
    alone = [c for c in comparison.cells if c.verdict == "slower"]
    assert len(alone) == 3 and not any(c.decides for c in comparison.cells)  # one process each would flag three
    level = comparison.run_level
    assert level.cells == 6 and level.verdict == "unchanged" and level.ci95_low < 1.0 < level.ci95_high
    assert comparison.exit_code == 0 and comparison.regressions == []
    assert main(["compare", str(base), str(new)]) == 0
    out = capsys.readouterr().out
    assert "slower (one process)" in out and "judged together" in out and "no significant regression" in out


def test_one_round_cells_all_slower_like_a_busy_machine_are_flagged_at_the_run_level(tmp_path: Path, capsys) -> None:
    """Every cell 1.6x-2.4x slower (both cores busy with other work): the run level says slower, exit 1."""
    factors = [1.6, 2.4, 1.9, 2.0, 1.7, 2.2]
    ids = _cells(len(factors))
    base = write_run(tmp_path, "base", {c: _noise(30, 300 + i) for i, c in enumerate(ids)})
    new = write_run(tmp_path, "new", {c: _noise(30, 400 + i, 10.0 * f) for i, (c, f) in enumerate(zip(ids, factors, strict=True))})
    comparison = compare_runs(base, new)
    level = comparison.run_level
    assert level.verdict == "slower" and level.ci95_low > 1.1 and level.ratio == pytest.approx(1.95, rel=0.05)
    assert comparison.exit_code == 1 and comparison.regressions == []  # no single cell decides
    assert main(["compare", str(base), str(new)]) == 1
    assert "significantly slower together" in capsys.readouterr().out


def test_fewer_one_round_cells_than_the_run_level_needs_decide_one_by_one_and_say_so(tmp_path: Path, capsys) -> None:
    fwd = _noise(30, 500)
    base = write_run(tmp_path, "base", {FWD: fwd, BWD: _noise(30, 501, 30.0)})
    new = write_run(tmp_path, "new", {FWD: fwd * 1.3, BWD: _noise(30, 502, 30.0)})
    comparison = compare_runs(base, new)
    assert comparison.run_level.verdict == "too_few_cells" and comparison.run_level.cells == 2
    assert [c.cell_id for c in comparison.regressions] == [FWD] and comparison.exit_code == 1
    main(["compare", str(base), str(new)])
    assert "fewer than 3 to judge the run as a whole" in capsys.readouterr().out


def test_cells_with_rounds_need_welch_p_below_alpha_over_the_number_of_cells(tmp_path: Path) -> None:
    """A 1.2x cell with p between 0.05/6 and 0.05 is flagged alone but not among six cells with rounds."""
    offsets_base, offsets_new = [-0.04, 0.0, 0.04], [0.0, 0.05, 0.12]
    one = compare_runs(write_run(tmp_path, "b1", {FWD: _rounds(600, offsets_base)}),
                       write_run(tmp_path, "n1", {FWD: _rounds(610, offsets_new, center_ms=11.0)}))  # fmt: skip
    (cell,) = one.cells
    assert cell.ci_level == "rounds" and 0.05 / 6 < cell.p_value < 0.05 and cell.ratio > 1.1
    assert cell.verdict == "slower" and one.exit_code == 1
    ids = _cells(6)
    same = {c: _rounds(620 + 10 * i, [-0.01, 0.0, 0.01]) for i, c in enumerate(ids[1:])}
    base = write_run(tmp_path, "b6", {ids[0]: _rounds(600, offsets_base), **same})
    new = write_run(tmp_path, "n6", {ids[0]: _rounds(610, offsets_new, center_ms=11.0), **same})
    six = compare_runs(base, new)
    first = next(c for c in six.cells if c.cell_id == ids[0])
    assert first.p_value == pytest.approx(cell.p_value) and first.verdict == "unchanged" and six.exit_code == 0
    assert six.run_level.verdict == ""  # no one-round cells
