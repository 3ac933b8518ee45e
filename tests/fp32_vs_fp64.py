"""Measure how far each framework's fp32 results lie from float64 on generated configurations.

    python -m tests.fp32_vs_fp64 --train-examples 40 --eval-examples 20 --out reports/fp32-vs-fp64/errors.csv
    python -m tests.fp32_vs_fp64 --summarize reports/fp32-vs-fp64/errors.csv     # the tables of the README

For the cases the float64 proof draws (tests/generated_configs.py, a fixed derandomized sequence), each
framework is run in fp32 and in fp64 on the same float32 inputs and weights, and the distance is written
per case and framework (`comparison` = the framework), and between the fp32 results of every pair of
frameworks (`comparison` = "a-b"), in the metrics of the fp32 rules of tests/conftest.py:

- heatmaps_rel_err: the largest per-stack ||a - b|| / ||b|| (assert_close);
- loss_rel_err: |a - b| / |b|;
- grad_rule_err: the largest over parameters of ||a - b|| / (||b|| + typical), the ratio assert_grads_close
  compares with its tolerance (typical = RMS element of the whole gradient x sqrt(size));
- grad_max_param_rel_err and grad_max_param: the largest plain ||a - b|| / ||b|| of one parameter and
  which (BN-cancelled biases left out: zero in exact arithmetic); grad_median_param_rel_err;
- grad_whole_rel_err: ||a - b|| / ||b|| of all gradients together.

Train-mode inputs are redrawn (up to --redraws times) until no ReLU input or max-pool gap lies within
3e-5 of its tensor's spread of a kink, as the fp32 tests draw them; `kink_margin` records the margin the
draw reached (large networks have too many activations to get there: their errors include kink flips).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from pathlib import Path

import numpy as np
from hypothesis import Phase, given, settings

import impls
from impls import spec
from impls.base import io_dtype, smallest_train_batch
from tests.fp64_proof import rel
from tests.generated_configs import Case, cases
from tests.numpy_reference import NumpyHourglass

FP32_KINK_MARGIN = 3e-5  # as tests/conftest.py's Draw.inputs_away_from_kinks
COLUMNS = [
    "example", "comparison", "train_mode", "num_stacks", "depth", "channels", "num_keypoints", "input_height",
    "input_width", "block", "stem_pool", "padding", "conv_bias", "batch_size", "seed", "kink_margin", "redraws",
    "heatmaps_rel_err", "loss_rel_err", "grad_rule_err", "grad_max_param_rel_err", "grad_max_param",
    "grad_median_param_rel_err", "grad_whole_rel_err",
]  # fmt: skip


def _inputs(case: Case, redraws: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """float32-valued (x, target) as float64, the draw's kink margin and how many redraws it took."""
    reference = NumpyHourglass(case.config, case.weights(), train_mode=True)
    best = None
    for redraw in range(redraws + 1 if case.train_mode else 1):
        x, target = (a.astype(np.float32).astype(np.float64) for a in case.inputs(redraw))
        reference(x)
        if best is None or reference.kink_margin > best[2]:
            best = (x, target, float(reference.kink_margin), redraw)
        if reference.kink_margin > FP32_KINK_MARGIN:
            break
    assert best is not None
    return best


def _run(framework: str, case: Case, precision: str, x: np.ndarray, target: np.ndarray) -> dict:
    model = impls.load(framework).build(case.config, weights=case.weights(), precision=precision)
    dtype = io_dtype(precision)
    out = {"heatmaps": model.predict(x.astype(dtype), train_mode=case.train_mode).astype(np.float64)}
    if case.train_mode:
        loss, grads = model.loss_and_grads(x.astype(dtype), target.astype(dtype))
        out.update(loss=loss, grads={n: g.astype(np.float64) for n, g in grads.items()})
    return out


def _errors(got: dict, want: dict, config: impls.HourglassConfig) -> dict:
    """The fp32 rules' metrics of `got` against `want` (module docstring)."""
    row: dict = {"heatmaps_rel_err": max(rel(a, b) for a, b in zip(got["heatmaps"], want["heatmaps"], strict=True))}
    if "grads" not in want:
        return row
    ga, gb = got["grads"], want["grads"]
    rms = math.sqrt(sum(float(np.sum(g * g)) for g in gb.values()) / sum(g.size for g in gb.values()))
    cancelled = set(spec.bn_cancelled_biases(config))
    rule = {n: float(np.linalg.norm(ga[n] - gb[n])) / (float(np.linalg.norm(gb[n])) + rms * math.sqrt(gb[n].size))
            for n in gb}  # fmt: skip
    relative = {n: rel(ga[n], gb[n]) for n in gb if n not in cancelled}
    worst = max(relative, key=relative.get)
    whole = math.sqrt(sum(float(np.sum((ga[n] - gb[n]) ** 2)) for n in gb)) / (rms * math.sqrt(sum(g.size for g in gb.values())))
    row.update(
        loss_rel_err=rel(got["loss"], want["loss"]), grad_rule_err=max(rule.values()),
        grad_max_param_rel_err=relative[worst], grad_max_param=worst,
        grad_median_param_rel_err=float(np.median(list(relative.values()))), grad_whole_rel_err=whole,
    )  # fmt: skip
    return row


def measure(case: Case, frameworks: list[str], redraws: int, example: int) -> list[dict]:
    """Rows for one case: each framework's fp32 against its fp64, and every pair of fp32 results; none for a
    train-mode case every framework refuses (batch 1 at a 1x1 level)."""
    if case.train_mode and case.batch_size < smallest_train_batch(case.config):
        return []
    x, target, margin, redraw = _inputs(case, redraws)
    c = case.config
    base = {
        "example": example, "train_mode": case.train_mode, "num_stacks": c.num_stacks, "depth": c.depth,
        "channels": c.channels, "num_keypoints": c.num_keypoints, "input_height": c.input_hw[0],
        "input_width": c.input_hw[1], "block": c.block, "stem_pool": c.stem_pool, "padding": c.padding,
        "conv_bias": c.conv_bias, "batch_size": case.batch_size, "seed": case.seed,
        "kink_margin": margin if case.train_mode else "", "redraws": redraw,
    }  # fmt: skip
    fp32 = {fw: _run(fw, case, "fp32", x, target) for fw in frameworks}
    rows = []
    for fw in frameworks:
        rows.append({**base, "comparison": fw, **_errors(fp32[fw], _run(fw, case, "fp64", x, target), c)})
    for a, b in itertools.combinations(frameworks, 2):
        rows.append({**base, "comparison": f"{a}-{b}", **_errors(fp32[a], fp32[b], c)})
    return rows


SUMMARY_METRICS = ["heatmaps_rel_err", "loss_rel_err", "grad_rule_err", "grad_max_param_rel_err", "grad_whole_rel_err"]


def summarize(path: Path) -> str:
    """Markdown tables of a measurement CSV: per comparison, the median / 90th percentile / largest of each
    metric, for train-mode draws that reached the fp32 tests' kink margin, for all train-mode draws, and
    for eval mode (heatmaps only)."""
    import pandas as pd

    data = pd.read_csv(path)
    train = data[data["train_mode"]]
    parts = []
    for title, rows, metrics in (
        (f"train mode, draws at least {FP32_KINK_MARGIN:g} from every kink", train[train["kink_margin"] >= FP32_KINK_MARGIN], SUMMARY_METRICS),
        ("train mode, every draw", train, SUMMARY_METRICS),
        ("eval mode", data[~data["train_mode"]], ["heatmaps_rel_err"]),
    ):  # fmt: skip
        lines = [f"{title} ({rows['example'].nunique()} configs): median / 90th percentile / largest", "",
                 "| comparison | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]  # fmt: skip
        for comparison, group in rows.groupby("comparison", sort=False):
            cells = [" / ".join(f"{q:.1e}" for q in group[m].quantile([0.5, 0.9, 1.0])) for m in metrics]
            lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, measure the cases, write the CSV (rewritten after every case); or summarize one."""
    parser = argparse.ArgumentParser(prog="python -m tests.fp32_vs_fp64", description=__doc__.split("\n\n")[0])
    parser.add_argument("--summarize", type=Path, metavar="CSV", help="print the summary tables of a measurement")
    parser.add_argument("--train-examples", type=int, default=30, help="train-mode cases (default 30)")
    parser.add_argument("--eval-examples", type=int, default=30, help="eval-mode cases (default 30)")
    parser.add_argument("--frameworks", default=",".join(impls.installed_frameworks()),
                        help="comma-separated (default: every installed one)")  # fmt: skip
    parser.add_argument("--redraws", type=int, default=30, help="train-mode input redraws to get away from kinks")
    parser.add_argument("--out", type=Path, help="the CSV to write")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.out is None:
        parser.error("--out is required to measure (or give --summarize CSV)")
    frameworks = [f for f in args.frameworks.split(",") if f]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def write() -> None:
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="raise")
            writer.writeheader()
            writer.writerows(rows)

    for train_mode, count in ((True, args.train_examples), (False, args.eval_examples)):
        if count <= 0:
            continue

        @settings(max_examples=count, derandomize=True, database=None, deadline=None, phases=[Phase.generate])
        @given(case=cases(train_mode=train_mode))
        def one(case: Case) -> None:
            example = len({r["example"] for r in rows})
            new = measure(case, frameworks, args.redraws, example)
            rows.extend(new)
            write()
            print(f"{example}: {case!r}" if new else f"refused alike, not measured: {case!r}", file=sys.stderr, flush=True)

        one()
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
