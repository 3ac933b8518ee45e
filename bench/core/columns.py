"""The one place for what a run directory's files hold: column names, statuses and file names.

Every writer and reader of a run directory (bench.core.rundir) takes its schema from here. Units are in
the column names (`latency_ms_median`, `gpu_allocator_peak_bytes`), except `ms` in stages.csv, which is
milliseconds per step.
"""

from __future__ import annotations

# ---------------------------------------------------------------- statuses

OK = "ok"
SKIPPED = "skipped"
FAILED_STATUSES: tuple[str, ...] = ("failed", "timeout", "oom")  # a cell that should have measured and did not
FINAL_STATUSES: tuple[str, ...] = (OK, "failed", SKIPPED, "timeout", "oom")
# run.json "status": a run in progress, finished, or stopped early (Ctrl-C, SIGTERM, SIGHUP, disk full).
RUN_STATUSES: tuple[str, ...] = ("running", "complete", "interrupted")

# ---------------------------------------------------------------- bench run: summary.csv and samples.csv

SUMMARY_CSV = "summary.csv"
SAMPLES_CSV = "samples.csv"
RUN_JSON = "run.json"
LOGS_DIR = "logs"

CELL_COLUMNS = ["cell_id", "kind", "framework", "execution", "precision", "batch_size", "phase"]
CONFIG_COLUMNS = ["preset", "num_stacks", "depth", "channels", "num_keypoints", "input_height", "input_width"]
SUMMARY_COLUMNS = [
    *CELL_COLUMNS,
    "device",
    "status",
    "error",
    "n_samples",
    "latency_ms_median",
    "latency_ms_mean",
    "latency_ms_std",
    "latency_ms_min",
    "latency_ms_p5",
    "latency_ms_p95",
    "latency_ms_iqr",
    "latency_ms_median_ci95_low",
    "latency_ms_median_ci95_high",
    "noisy",
    "first_call_ms",
    "throughput_img_per_s",
    "gflop_per_step",
    "achieved_gflop_per_s",
    "conv_ceiling_gflop_per_s",
    "ceiling_fraction",
    "framework_ceiling_gflop_per_s",
    "framework_ceiling_fraction",
    "num_params",
    "injected_slowdown",
    "equivalence_max_rel_err",
    "equivalent",
    "gradient_max_rel_err",
    "gradients_equivalent",
    "gpu_allocator_peak_bytes",
    "nvml_process_used_bytes",
    "nvml_device_used_bytes",
    "host_peak_rss_bytes",
    "warmup_calls",
    "import_s",
    "build_s",
    "setup_s",
    "worker_wall_s",
    *CONFIG_COLUMNS,
]
SAMPLE_COLUMNS = [*CELL_COLUMNS, "iteration", "latency_ns"]
# Columns of summary.csv that hold text or booleans; every other column holds a number or nothing.
SUMMARY_TEXT_COLUMNS = frozenset(
    {*CELL_COLUMNS, "device", "status", "error", "noisy", "equivalent", "gradients_equivalent", "preset"} - {"batch_size"}
)
SUMMARY_REQUIRED = [*CELL_COLUMNS, "status"]
SAMPLES_REQUIRED = ["cell_id", "latency_ns"]

# ---------------------------------------------------------------- bench profile: stages, ops, flops, compile

STAGE_COLUMNS = [
    "framework",
    "execution",
    "phase",
    "batch_size",
    "precision",
    "stage",
    "ms",
    "share_of_step",
    "method",
    "stage_step_ms",
    "step_ms",
    "status",
    "error",
    "analytic_conv_flops",
    "conv_gflop_per_s",
]
# What a report needs from stages.csv (the rest is optional there).
REQUIRED_STAGE_COLUMNS = [
    c for c in STAGE_COLUMNS if c not in ("batch_size", "precision", "analytic_conv_flops", "conv_gflop_per_s")
]
OP_COLUMNS = ["framework", "execution", "phase", "rank", "op", "calls", "total_ms", "self_ms", "share_of_step"]
FLOP_COLUMNS = [
    "framework",
    "execution",
    "phase",
    "batch_size",
    "analytic_conv_flops",
    "reported_conv_flops",
    "conv_diff_percent",
    "reported_total_flops",
    "source",
    "note",
]
COMPILE_COLUMNS = [
    "framework",
    "execution",
    "phase",
    "first_call_ms",
    "trace_compile_ms",
    "recompilations_in_timed_loop",
    "program_size",
    "program_size_unit",
    "note",
]
PROFILE_CSVS: dict[str, list[str]] = {
    "stages.csv": STAGE_COLUMNS,
    "ops.csv": OP_COLUMNS,
    "flops.csv": FLOP_COLUMNS,
    "compile.csv": COMPILE_COLUMNS,
}
PROFILE_REQUIRED: dict[str, list[str]] = {"stages.csv": REQUIRED_STAGE_COLUMNS}
PROFILE_TEXT_COLUMNS = frozenset(
    {"framework", "execution", "phase", "precision", "stage", "method", "status", "error", "op", "source", "note",
     "program_size_unit"}
)  # fmt: skip
