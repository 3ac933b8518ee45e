"""`bench report` and the plots: real figures from a checked-in tiny run, bad input, failed cells, a browser.

tests/fixtures/tiny_run/ is a real `python -m bench run --framework all --preset tiny --iters 3 --warmup 1
--batch-size 1,2` run of this machine (logs dropped), so the batch-sweep figures are drawn too.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from bench import cli
from bench.core import settings
from bench.core.rundir import read_run
from bench.report import plots
from bench.report import run_report as report

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_run"
SWEEP_FIGURES = ("latency", "throughput_vs_batch", "memory_vs_batch", "distribution", "compile_cost", "efficiency")
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of the fixture run, built once for the module (figures take a few seconds)."""
    out = tmp_path_factory.mktemp("report")
    report.build_report([FIXTURE], out)
    return out


def copy_run(tmp_path: Path, name: str = "run") -> Path:
    """A writable copy of the fixture run."""
    return Path(shutil.copytree(FIXTURE, tmp_path / name))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header; fails when the file is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def report_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- figures and pages


@pytest.mark.parametrize("name", SWEEP_FIGURES)
def test_report_figure_is_a_valid_png_of_the_fixed_size(tiny_report: Path, name: str) -> None:
    path = tiny_report / f"{name}.png"
    width, height = plots.FIGURE_PX[name]
    assert png_size(path) == (width, height)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert float(pixels[..., :3].std()) > 0.01, f"{name}.png is blank"


def test_report_html_embeds_every_figure_and_the_summary_table(tiny_report: Path) -> None:
    page = (tiny_report / "report.html").read_text()
    embedded = dict(re.findall(r'data-figure="([\w.]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page))
    assert sorted(embedded) == sorted(f"{name}.png" for name in SWEEP_FIGURES)
    for name, data in embedded.items():
        assert base64.b64decode(data) == (tiny_report / name).read_bytes(), f"{name} embedded differs from the file"
    assert 'id="summary-table"' in page and "speedup vs torch" in page
    summary = pd.read_html(page, attrs={"id": "summary-table"})[0] if _has_lxml() else None
    if summary is not None:
        assert set(summary["framework"]) == {"torch", "tensorflow", "jax"}
    assert not re.search(r'(src|href)="(https?:)?//', page), "the report must not load anything from the network"


def _has_lxml() -> bool:
    try:
        import lxml  # noqa: F401
    except ImportError:
        return False
    return True


def test_report_markdown_links_every_figure_and_tables(tiny_report: Path) -> None:
    text = (tiny_report / "report.md").read_text()
    for name in SWEEP_FIGURES:
        assert f"]({name}.png)" in text
    for heading in ("## Summary (baseline: torch)", "## Cells", "## Equivalence", "## Environment", "## Warnings"):
        assert heading in text
    assert text.count("-b2-forward |") == 6  # every batch-2 forward cell of the sweep is listed


def test_report_equivalence_table_shows_the_fp64_gradient_check(tmp_path: Path) -> None:
    run = copy_run(tmp_path)
    record = json.loads((run / "run.json").read_text())
    assert "gradient_check" not in record  # a run from before the check: its columns stay empty (tiny_report)
    entry = {"status": "ok", "max_rel_err": 3.2e-13, "equivalent": True, "worst_parameter": "stem.conv.kernel"}
    record["gradient_check"] = {"rtol": 1e-8, "batch_size": 1, "precision": "fp64", "frameworks": {
        "torch": entry, "tensorflow": entry,
        "jax": {**entry, "max_rel_err": 4.0e-6, "equivalent": False, "worst_parameter": "head_0.lin_bn.scale"},
    }}  # fmt: skip
    (run / "run.json").write_text(json.dumps(record))
    report.build_report([run], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    table = text.split("## Equivalence")[1].split("## Environment")[0]
    assert "gradients (fp64, batch 1): largest error" in table and "gradients agree" in table
    assert "3.20e-13" in table and "4.00e-06" in table and "| NO |" in table
    assert "jax's fp64 GRADIENTS DISAGREE" in text and "head_0.lin_bn.scale" in text


def test_report_summary_gives_each_framework_its_best_cell_and_speedup_vs_baseline() -> None:
    table = report.model_table(report.load_runs([FIXTURE]))
    best = report.best_per_framework(table, "tensorflow")
    forward = best[best["phase"] == "forward"].set_index("framework")
    assert list(forward.index) == ["torch", "tensorflow", "jax"]
    assert forward.loc["tensorflow", "speedup_vs_baseline"] == pytest.approx(1.0)
    ok = table[(table["phase"] == "forward") & (table["status"] == "ok")]
    for fw in ("torch", "jax"):
        fastest = ok[ok["framework"] == fw]["throughput_img_per_s"].max()
        base = ok[ok["framework"] == "tensorflow"]["throughput_img_per_s"].max()
        assert forward.loc[fw, "speedup_vs_baseline"] == pytest.approx(fastest / base)


def test_payback_iterations_is_first_call_over_the_per_step_saving() -> None:
    assert plots.payback_iterations(1000.0, 20.0, 10.0) == pytest.approx(100.0)
    assert plots.payback_iterations(1000.0, 10.0, 12.0) == float("inf")  # compiled not faster: never
    assert np.isnan(plots.payback_iterations(float("nan"), 20.0, 10.0))


def test_report_of_several_runs_shows_them_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = copy_run(tmp_path, "a"), copy_run(tmp_path, "b")
    code, out, _ = report_cli([str(first), str(second), "--out", str(tmp_path / "both")], capsys)
    assert code == 0 and "report.html" in out
    text = (tmp_path / "both" / "report.md").read_text()
    label = json.loads((FIXTURE / "run.json").read_text())["run_id"]
    assert f"| {label} | forward | torch |" in text and f"| {label} #2 | forward | torch |" in text


def test_report_keeps_a_failed_cell_and_warns_about_it(tmp_path: Path) -> None:
    run_dir = copy_run(tmp_path)
    summary = pd.read_csv(run_dir / "summary.csv", dtype={"error": "string"})
    target = (summary["kind"] == "model") & (summary["cell_id"] == "jax-jit-fp32-b2-forward")
    summary.loc[target, ["status", "error"]] = ["oom", "RESOURCE_EXHAUSTED: out of memory"]
    summary.loc[target, "latency_ms_median"] = np.nan
    summary.to_csv(run_dir / "summary.csv", index=False)
    report.build_report([run_dir], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| jax-jit-fp32-b2-forward | oom |" in text
    assert "jax-jit-fp32-b2-forward oom: RESOURCE_EXHAUSTED: out of memory" in text


def test_report_of_a_run_with_only_failed_cells_says_so(tmp_path: Path) -> None:
    run_dir = copy_run(tmp_path)
    summary = pd.read_csv(run_dir / "summary.csv", dtype={"error": "string"})
    summary["status"], summary["error"] = "failed", "RuntimeError: worker died"
    for column in summary.loc[:, "n_samples":"ceiling_fraction"].columns:
        summary[column] = np.nan
    summary.to_csv(run_dir / "summary.csv", index=False)
    (run_dir / "samples.csv").unlink()
    html_path = report.build_report([run_dir], tmp_path / "out")
    page = html_path.read_text()
    assert re.search(r"No cell of run \S+ succeeded \(24 failed\)", page)
    assert "none (12 failed)" not in page and "none (4 failed)" in page  # each framework still has a row
    for name in ("latency", "distribution", "compile_cost", "efficiency"):
        assert png_size(tmp_path / "out" / f"{name}.png") == plots.FIGURE_PX[name]


# ---------------------------------------------------------------- bad input: exit 2, one line, no traceback


def test_report_missing_folder_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = report_cli([str(tmp_path / "nope")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "nope' does not exist" in err and "python -m bench run" in err


def test_report_foreign_csv_exits_2_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "foreign"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    (run_dir / "summary.csv").write_text("date,open,close\n2024-01-01,1.0,2.0\n")
    code, _, err = report_cli([str(run_dir)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{run_dir / 'summary.csv'} is not an hgbench results file (missing columns cell_id" in err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda text: text + "a,b,c\n" + ",".join(["x"] * 80) + "\n", "is not a readable CSV"),
        (lambda text: text.replace(",ok,,3,", ",ok,,three,", 1), "is malformed: column n_samples holds 'three'"),
        (lambda text: text.replace(",ok,", ",finished,", 1), "unknown status 'finished'"),
        (lambda text: "", "is empty"),
    ],
    ids=["ragged_rows", "text_in_a_number_column", "unknown_status", "empty_file"],
)
def test_report_malformed_summary_exits_2_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, message: str
) -> None:
    run_dir = copy_run(tmp_path)
    path = run_dir / "summary.csv"
    path.write_text(damage(path.read_text()))
    code, _, err = report_cli([str(run_dir)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert message in err and str(path) in err


def test_report_malformed_run_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(tmp_path)
    (run_dir / "run.json").write_text("{not json")
    code, _, err = report_cli([str(run_dir)], capsys)
    assert code == 2 and "run.json is not valid JSON" in err


def test_report_unknown_baseline_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = report_cli([str(FIXTURE), "--baseline", "mxnet"], capsys)
    assert code == 2 and "--baseline must be one of torch, tensorflow, jax, got 'mxnet'" in err


# ---------------------------------------------------------------- the report at the end of `bench run`


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Workers load tests/fake_backend.py (fast, no framework), every framework installed."""
    monkeypatch.setenv("HGBENCH_BACKEND_OVERRIDE", "tests.fake_backend")
    monkeypatch.delenv("HGBENCH_FAKE_FAULTS", raising=False)
    monkeypatch.setattr(settings.nvml, "gpu_present", lambda: False)
    monkeypatch.setattr(settings, "is_installed", lambda fw: True)
    return monkeypatch


FAKE_RUN = "run --preset tiny --iters 3 --warmup 1 --framework torch --execution default --impl idiomatic".split()


def test_run_writes_its_report_beside_the_results(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cli.main([*FAKE_RUN, "--out", str(tmp_path / "results")]) == 0
    (run_dir,) = (tmp_path / "results").iterdir()
    assert (tmp_path / "reports" / run_dir.name / "report.html").is_file()


def test_run_with_no_report_writes_none(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cli.main([*FAKE_RUN, "--out", str(tmp_path / "results"), "--no-report"]) == 0
    assert not (tmp_path / "reports").exists()


def test_run_whose_report_fails_keeps_results_and_exit_code(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("plotting broke")

    fake.setattr(report, "build_report", broken)
    assert cli.main([*FAKE_RUN, "--out", str(tmp_path / "results")]) == 0
    (run_dir,) = (tmp_path / "results").iterdir()
    assert len(pd.read_csv(run_dir / "summary.csv")) == 5  # 3 calibration workloads + 2 phases
    printed = capsys.readouterr().out
    assert "the report could not be written (RuntimeError: plotting broke)" in " ".join(printed.split())


# ---------------------------------------------------------------- a real browser


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


_IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0)).map((img) => img.alt);
  const probe = document.createElement("pre");
  probe.id = "image-probe";
  probe.textContent = `images=${images.length} broken=${broken.join(",") || "none"}`;
  document.body.appendChild(probe);
});
</script></body>"""


def test_report_html_renders_in_headless_chromium_without_errors(tiny_report: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found; install it with: apt-get install -y chromium"
        if os.environ.get("HGBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{message} (HGBENCH_REQUIRE_BROWSER=1 asks for the browser test)")
        pytest.skip(message)
    page = tiny_report / "report.html"
    screenshot = tmp_path / "screenshot.png"
    shot = _chromium(f"--screenshot={screenshot}", "--window-size=1280,2000", page.as_uri(), profile=tmp_path / "p1")
    console_errors = [line for line in shot.stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]
    assert not console_errors, "\n".join(console_errors)
    assert screenshot.is_file(), shot.stderr[-2000:]
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (2000, 1280) and float(pixels[..., :3].var()) > 0

    probed = tmp_path / "probed.html"  # the same page plus a script that writes what loaded into the DOM
    probed.write_text(page.read_text().replace("</body>", _IMAGE_PROBE, 1))
    dump = _chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), profile=tmp_path / "p2")
    found = re.search(r"images=(\d+) broken=([\w,]+)", dump.stdout)
    assert found, f"the probe did not run: {dump.stderr[-2000:]}"
    assert found.group(1) == str(len(SWEEP_FIGURES)) and found.group(2) == "none"
    assert not [line for line in dump.stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]


def test_report_summary_shows_the_ceiling_shares_the_cells_table_shows(tmp_path: Path) -> None:
    """The summary's "% ceiling" columns carry the best cell's shares, as the cells table does."""
    run_dir = copy_run(tmp_path)
    path = run_dir / "summary.csv"
    frame = pd.read_csv(path)
    model = frame["kind"] == "model"
    frame.loc[model, "ceiling_fraction"] = 0.25
    frame.loc[model, "framework_ceiling_fraction"] = 0.5
    frame.to_csv(path, index=False)
    best = report.best_per_framework(report.model_table(report.load_runs([run_dir])), "torch")
    shown = report._summary_display(best[best["status"] == "ok"], "torch", multi=False)
    assert set(shown["% ceiling"]) == {"25"} and set(shown["% own fw ceiling"]) == {"50"}


def test_report_speedup_carries_an_interval_and_unranked_when_it_holds_one() -> None:
    runs = report.load_runs([FIXTURE])
    table = report.model_table(runs)
    samples = pd.concat([run.samples.assign(run=run.label) for run in runs], ignore_index=True)
    best = report.best_per_framework(table, "torch", samples)
    others = best[(best["status"] == "ok") & (best["framework"] != "torch")]
    assert not others.empty
    for r in others.to_dict("records"):
        assert r["speedup_ci95_low"] <= r["speedup_vs_baseline"] <= r["speedup_ci95_high"]
        text = report._speedup_text(r, "torch")
        assert ("not distinguishable from torch" in text) == (r["speedup_ci95_low"] <= 1.0 <= r["speedup_ci95_high"])
    # Two cells of one distribution: their speedup interval holds 1, so they are not ranked.
    same = {"framework": "jax", "speedup_vs_baseline": 1.01, "speedup_ci95_low": 0.97, "speedup_ci95_high": 1.05,
            "speedup_ci_level": "rounds"}  # fmt: skip
    assert report._speedup_text(same, "torch") == "1.01x (0.97-1.05), not distinguishable from torch"
    apart = {**same, "speedup_vs_baseline": 0.8, "speedup_ci95_low": 0.76, "speedup_ci95_high": 0.84,
             "speedup_ci_level": "within-process"}  # fmt: skip
    assert report._speedup_text(apart, "torch") == "0.80x (0.76-0.84, one round: within-process interval)"


def test_run_of_every_variant_checks_each_and_reports_the_gap(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--impl all: a cell, an equivalence entry and a gradient entry per variant; the report's variants table
    puts each tuned cell against its idiomatic twin (the fake's variants compute alike, so ratios near 1)."""
    args = "run --preset tiny --iters 3 --warmup 1 --framework tf,jax --execution default --impl all".split()
    assert cli.main([*args, "--out", str(tmp_path / "results")]) == 0
    (run_dir,) = (tmp_path / "results").iterdir()
    table = pd.read_csv(run_dir / "summary.csv")
    model = table[table["kind"] == "model"].set_index("cell_id")
    assert set(model.index) == {f"{v}-{ex}-fp32-b1-{ph}" for v, ex in (("tensorflow", "eager"), ("tensorflow-tuned", "eager"),
                                                                     ("jax", "jit"), ("jax-tuned", "jit"))
                                for ph in ("forward", "forward_backward")}  # fmt: skip
    assert model.loc["jax-tuned-jit-fp32-b1-forward", "impl"] == "tuned"
    assert model.loc["jax-jit-fp32-b1-forward", "impl"] == "idiomatic"
    record = json.loads((run_dir / "run.json").read_text())
    assert set(record["equivalence"]["frameworks"]) == {"tensorflow", "tensorflow-tuned", "jax", "jax-tuned"}
    assert record["equivalence"]["frameworks"]["jax-tuned"]["impl"] == "tuned"
    assert set(record["gradient_check"]["frameworks"]) == {"tensorflow", "tensorflow-tuned", "jax", "jax-tuned"}
    assert record["settings"]["impls"] == {"tensorflow": ["idiomatic", "tuned"], "jax": ["idiomatic", "tuned"]}
    gap = report.variant_gap(report.model_table([read_run(run_dir)]))
    assert len(gap) == 4 and set(gap["impl"]) == {"tuned"}  # 2 frameworks x 2 phases
    ms = model["latency_ms_median"]
    row = gap[(gap["framework"] == "jax") & (gap["phase"] == "forward")].iloc[0]
    assert row["ratio"] == pytest.approx(ms["jax-tuned-jit-fp32-b1-forward"] / ms["jax-jit-fp32-b1-forward"])
    assert "dot_general" in row["changes"]
    markdown = (tmp_path / "reports" / run_dir.name / "report.md").read_text()
    section = markdown.split("## Implementation variants")[1].split("## Warnings")[0]
    assert section.count("| tuned |") == 4 and "FusedBatchNormV3" in section


def test_report_warns_when_a_runs_cells_ran_on_different_node_types(tmp_path: Path) -> None:
    run_dir = copy_run(tmp_path)
    record = json.loads((run_dir / "run.json").read_text())
    env = record["environment"]
    record["executor"], record["nodes"] = "ray", {"n1": env, "n2": {**env, "cpu_model": "Other CPU", "host": "other"}}
    (run_dir / "run.json").write_text(json.dumps(record))
    summary = pd.read_csv(run_dir / "summary.csv")
    summary["node_id"] = ["n1" if i % 2 else "n2" for i in range(len(summary))]
    summary.to_csv(run_dir / "summary.csv", index=False)
    runs = report.load_runs([run_dir])
    table = report.model_table(runs)
    notes = report.collect_warnings(runs, table, report.best_per_framework(table, "torch"), "torch")
    (note,) = [n for n in notes if "node types" in n]
    assert note.startswith("cells ran on 2 different node types (") and "Other CPU, " in note
    alone = copy_run(tmp_path, "alone")  # one node type: nothing to say
    runs = report.load_runs([alone])
    table = report.model_table(runs)
    assert not [n for n in report.collect_warnings(runs, table, report.best_per_framework(table, "torch"), "torch")
                if "node types" in n]  # fmt: skip
