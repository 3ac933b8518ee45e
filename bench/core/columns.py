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
# The worker running now (pid, process group, cell), removed when it ends: one left behind means the
# parent died, and `--resume` kills what is left of that worker (bench.engine.procs).
LIVE_WORKER_JSON = "live_worker.json"

# impl: the implementation variant (impls.registry.IMPLS); runs made before variants existed have none, and
# read as the default one. devices: data-parallel replicas of the cell (batch_size is the global batch);
# runs made before --devices existed have none, and read as 1.
CELL_COLUMNS = ["cell_id", "kind", "framework", "impl", "execution", "precision", "batch_size", "phase", "devices"]
CONFIG_COLUMNS = ["preset", "num_stacks", "depth", "channels", "num_keypoints", "input_height", "input_width"]
SUMMARY_COLUMNS = [
    *CELL_COLUMNS,
    "device",  # where the cell actually ran
    "device_fallback",  # True: the run is on the GPU but this framework could not see it and ran on the CPU
    "fp32_math",  # ieee or tf32: how fp32 convolutions and matmuls ran (a CPU: ieee)
    # The machine that measured the cell and the executor's node id ("local", or a Ray node's id; run.json
    # `nodes` holds each node's environment); comma lists when a cell's rounds ran on several. Runs made before
    # executors existed have neither column and ran on the machine of run.json's environment.
    "host",
    "node_id",
    "per_device_batch",  # batch_size / devices: the images each replica computes per step
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
    "ci_level",  # rounds (t interval of the round medians) or within-process (one round: the process level is unknown)
    "latency_ms_rerun_pi95_low",  # where a rerun's median should fall, 95% (rounds only: bench.core.stats)
    "latency_ms_rerun_pi95_high",
    "n_rounds",
    "round_median_ms_min",
    "round_median_ms_max",
    "round_cv",  # coefficient of variation of the round medians: the process-to-process noise
    "noisy",
    "first_call_ms",
    "throughput_img_per_s",
    # throughput at N devices / (N x throughput at 1 device) for the same framework, variant, execution,
    # precision and per-device batch, from this run's 1-device cell (empty where that cell is missing)
    "scaling_efficiency",
    # data-parallel cells: the gradient all-reduce's time per step and share of the step, from the framework's
    # own profiler after the timed loop, and how it was found (empty where the profile does not expose it)
    "allreduce_ms",
    "allreduce_share",
    "allreduce_method",
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
    "gpu_allocator_peak_bytes",  # build to the end of the timed loop
    "gpu_allocator_setup_peak_bytes",  # first call and warm-up: compilation and autotuning scratch included
    "gpu_allocator_timed_peak_bytes",  # the timed loop alone (empty where the framework cannot reset: JAX)
    "compiled_argument_bytes",  # XLA's memory plan of the compiled step (JAX): arguments, outputs, temporaries
    "compiled_output_bytes",
    "compiled_temp_bytes",
    "nvml_process_used_bytes",
    "nvml_process_lookup",  # how the process figure was found: pid, device_minus_baseline, not_found, no_nvml
    "nvml_device_used_bytes",
    "host_peak_rss_bytes",
    "warmup_calls",
    "import_s",
    "build_s",
    "setup_s",
    "worker_wall_s",
    *CONFIG_COLUMNS,
]
SAMPLE_COLUMNS = [*CELL_COLUMNS, "round", "iteration", "latency_ns"]  # round: 1..R, the worker process
# Columns of summary.csv that hold text or booleans; every other column holds a number or nothing.
SUMMARY_TEXT_COLUMNS = frozenset(
    {*CELL_COLUMNS, "device", "status", "error", "noisy", "equivalent", "gradients_equivalent", "preset", "ci_level",
     "nvml_process_lookup", "device_fallback", "fp32_math", "host", "node_id", "allreduce_method"}
    - {"batch_size", "devices"}
)
# impl and devices: absent from runs made before variants and data parallelism existed
SUMMARY_REQUIRED = [*(c for c in CELL_COLUMNS if c not in ("impl", "devices")), "status"]
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

# ---------------------------------------------------------------- bench maxbatch: probes.csv and maxbatch.csv

_MAXBATCH_TARGET = ["framework", "execution", "precision", "phase", "device", "memory_budget_bytes"]
MAXBATCH_PROBE_COLUMNS = [
    *_MAXBATCH_TARGET,
    "batch_size",
    "status",
    "error",
    "fits",
    "peak_bytes",  # the GPU allocator's peak on a GPU, the worker's peak resident memory on a CPU
    "memory_source",
    "over_budget",
    "latency_ms_median",
    "throughput_img_per_s",
]
MAXBATCH_COLUMNS = [
    *_MAXBATCH_TARGET,
    "status",  # ok | none_fit | skipped | failed | timeout (a probe that failed for a reason other than memory)
    "error",
    "probes",
    "largest_batch",
    "largest_throughput_img_per_s",
    "largest_peak_bytes",
    "limited_by",  # memory, or the search limit (--limit) when every probe fit
    "best_batch",  # the throughput-optimal batch among those that fit
    "best_throughput_img_per_s",
]

