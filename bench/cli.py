"""Command line: `python -m bench run|list|env|overhead|compare|report|profile`. Parsing and dispatch only;
each command is a plain function in its package (bench.run, bench.profile, bench.report, bench.regress).

A user's mistake ends as one line on stderr ("error: ...") and exit code 2, never a traceback; a full disk
as one line and exit code 75 (README, "Exit codes").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.core.files import DISK_FULL_EXIT_CODE, OutputPathError, is_disk_full
from bench.core.rundir import RunDirError
from bench.core.settings import CONFIG_FLAGS, RunSettings, SettingsError, build_settings, parse_positive_int


class UsageError(Exception):
    """Bad command-line input; the message is printed as `error: <message>`."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


_RUN_EPILOG = """\
phases: forward = eval-mode BN, no gradients; forward_backward = train-mode BN, the loss summed over all
stacks, gradients of every trainable parameter, no optimizer update.
defaults: on a CPU the seed preset at batch 1, both phases, every execution mode (compiled ones
included), fp32, time-budgeted loops (a 2-core machine finishes within 10 minutes); on a GPU the seed's
batch of 16 and every execution. Exit codes: 0 all cells ok or skipped, 1 a cell failed, timed
out or ran out of memory (or a framework disagreed in the equivalence check), 2 bad input (an unwritable
--out included), 75 the disk filled up, 129/130/143 stopped by SIGHUP/Ctrl-C/SIGTERM; after 75 and
129-143, finished cells are kept and --resume completes the run."""


def _add_model_arguments(group: argparse._ArgumentGroup) -> None:
    """Which frameworks and which network: the options `run` and `profile` share."""
    group.add_argument("--framework", metavar="LIST", help="all (default) or a comma list: torch,tensorflow,jax")
    group.add_argument("--preset", help="model preset: seed (default), newell or tiny")
    for flag, field in CONFIG_FLAGS.items():
        group.add_argument(f"--{flag}", metavar="N", help=f"override the preset's {field}")
    group.add_argument("--input-size", metavar="HxW", help="override the input size: 256 or 256x192")


def build_parser() -> argparse.ArgumentParser:
    """The parser for every command (built when main() runs, not at import)."""
    parser = _Parser(prog="python -m bench", description="Benchmark the Stacked Hourglass implementations.")
    commands = parser.add_subparsers(dest="command", metavar="{run,list,env,doctor,maxbatch,overhead,compare,report,profile}", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser(
        "run", help="measure cells and write results/<run_id>/", epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    what = run.add_argument_group("what to measure")
    _add_model_arguments(what)
    what.add_argument("--batch-size", metavar="LIST", help="comma list of batch sizes, e.g. 1,8,16")
    what.add_argument("--phase", metavar="LIST", help="forward, forward_backward or all (default: both)")
    what.add_argument("--execution", metavar="LIST",
                      help="default, all, or a comma list of modes (eager, compile, function, xla, jit) "
                      "or framework:mode items such as torch:compile")  # fmt: skip
    what.add_argument("--impl", metavar="LIST",
                      help="implementation variants: idiomatic (default), tuned, all, or framework:variant items "
                      "such as jax:tuned (README \"Implementation variants\")")  # fmt: skip
    what.add_argument("--precision", metavar="LIST", help="fp32 (default), bf16, fp64 or a comma list (fp32,fp64)")
    what.add_argument("--device", help="auto (default: gpu when one is visible), cpu or gpu")
    what.add_argument("--devices", metavar="LIST",
                      help="data-parallel device counts, e.g. 1,2 (default 1): above 1 the forward_backward phase "
                           "runs in each framework's own engine (torch DDP, tf.distribute.MirroredStrategy, "
                           "jax.sharding); --batch-size is then the global batch, and without it each device "
                           "gets the default batch (README \"Data parallelism\")")  # fmt: skip
    what.add_argument("--protocol", help="default, or seed: the seed's loop (batch 16, 10 burn-in, 100 timed)")
    how = run.add_argument_group("how to measure")
    how.add_argument("--warmup", metavar="N", help="untimed calls after the separately timed first call")
    how.add_argument("--iters", metavar="N", help="timed iterations: exactly N, or at most N with --min-time")
    how.add_argument("--min-time", metavar="SECONDS", help="time iterations until this much time has passed")
    how.add_argument("--timeout", metavar="SECONDS", help="per cell, from worker start (default 900)")
    how.add_argument("--fp32-math", metavar="MODE",
                     help="on a GPU: ieee (default; full fp32) or tf32 (TensorFloat-32 convolutions and matmuls), "
                     "applied alike in every framework; a CPU computes fp32 in IEEE anyway")  # fmt: skip
    how.add_argument("--autotune", metavar="on|off", help="on a GPU: cuDNN/XLA autotuning in every framework (default on)")
    how.add_argument("--rounds", metavar="N",
                     help="worker processes per cell, interleaved over all cells (default: 1 on a CPU, 3 on a GPU); intervals "
                     "include the process-to-process noise only with 2 or more")  # fmt: skip
    how.add_argument("--timing-only", action="store_true", default=None,
                     help="measure the cells only: no equivalence or gradient check and no calibration first "
                     "(for repeated runs of cells another run checked, as CI's gate does after its first pair)")  # fmt: skip
    workers = run.add_argument_group("where workers run")
    workers.add_argument("--executor", metavar="local|ray",
                         help="local (default): one worker at a time on this machine; ray: each worker a Ray task "
                              "that takes a whole measurement slot of a node (pip install '.[ray]'; README \"Ray\")")  # fmt: skip
    workers.add_argument("--ray-address", metavar="HOST:PORT",
                         help="with --executor ray: the cluster's head (default: RAY_ADDRESS or a cluster `ray start` "
                              "left on this machine, else a fresh local one on the loopback interface; local: always "
                              "a fresh one)")  # fmt: skip
    where = run.add_argument_group("where results go")
    where.add_argument("--out", metavar="DIR", help="results directory (default: results/)")
    where.add_argument("--run-id", metavar="NAME", help="name the run folder OUT/NAME instead of <UTC time>-<device> (must not exist)")
    where.add_argument("--like", metavar="RUN_DIR",
                       help="measure exactly the cells of RUN_DIR with its recorded settings, into a new run (e.g. CI against results/baseline)")  # fmt: skip
    where.add_argument("--resume", metavar="RUN_DIR", help="complete an interrupted run with its recorded settings")
    where.add_argument("--no-report", action="store_true",
                       help="do not write the report (figures, report.md/html) into reports/<run_id>/ beside the results")  # fmt: skip

    lister = commands.add_parser("list", help="frameworks (installed or not), versions and devices")
    lister.add_argument(
        "--no-probe", action="store_true", help="do not start a worker per framework to ask for its devices"
    )
    commands.add_parser("env", help="print the environment record that run.json stores")
    commands.add_parser("doctor", help="does this machine give trustworthy numbers now? each problem with its fix "
                        "(exit 1 when a run would be untrustworthy)")  # fmt: skip

    maxbatch = commands.add_parser(
        "maxbatch", help="the largest batch that fits, per framework x execution x precision x phase (doubling, then bisection)",
        epilog=_MAXBATCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    what = maxbatch.add_argument_group("what to search (as for run)")
    _add_model_arguments(what)
    what.add_argument("--phase", metavar="LIST", help="forward, forward_backward or all (default: both)")
    what.add_argument("--execution", metavar="LIST", help="default (default), all or a comma list, as for run")
    what.add_argument("--precision", metavar="LIST", help="fp32 (default), bf16 or fp32,bf16")
    what.add_argument("--device", help="auto (default: gpu when one is visible), cpu or gpu")
    how = maxbatch.add_argument_group("how to search")
    how.add_argument("--memory-budget", metavar="SIZE",
                     help="largest peak memory that counts as fitting, e.g. 4GiB (needed on a CPU; on a GPU the "
                     "default is the device itself: out-of-memory ends the doubling)")  # fmt: skip
    how.add_argument("--start", metavar="N", help="first batch size (default 1)")
    how.add_argument("--limit", metavar="N", help="largest batch size tried (default 4096)")
    how.add_argument("--timeout", metavar="SECONDS", help="per probe, from worker start (default 900)")
    maxbatch.add_argument("--out", metavar="DIR", help="results directory (default: results/)")

    overhead = commands.add_parser("overhead", help="harness loop vs a bare loop on one cell's model (same process)")
    for flag, default in (("--framework", "torch"), ("--preset", "seed"), ("--phase", "forward"), ("--execution", "default"),
                          ("--precision", "fp32"), ("--batch-size", None), ("--device", None), ("--warmup", "3"), ("--iters", "5")):  # fmt: skip
        overhead.add_argument(
            flag, default=default, help=f"as for run (default: {default or 'as for run'}); the first cell is used"
        )
    overhead.add_argument(
        "--rounds", default="20", help="alternating rounds of --iters calls each, harness then bare loop (default 20)"
    )

    compare = commands.add_parser(
        "compare", help="is NEW_RUN significantly slower than BASE_RUN? (exit 1 when it is)", epilog=_COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    compare.add_argument("base_run", metavar="BASE_RUN", help="run directory to compare against, e.g. results/baseline")
    compare.add_argument("new_run", metavar="NEW_RUN", help="run directory to judge")
    compare.add_argument("--metric", default="latency_ms", help="latency_ms (default; the samples) or first_call_ms")
    compare.add_argument("--threshold", default="10%", help="smallest slowdown that fails, 10%% or 0.1 (default 10%%)")
    compare.add_argument("--normalize", action="store_true",
                         help="divide the new run's samples by the machine ratio of reference-conv times (two machines; a rough guide)")  # fmt: skip
    compare.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")
    compare.add_argument("--csv", metavar="FILE", help="also write one row per cell as CSV")
    compare.add_argument("--allow-partial", action="store_true",
                         help="a new run that is interrupted or lacks cells the base has ok is a warning, not exit 1")  # fmt: skip

    report = commands.add_parser("report", help="figures, report.md and a self-contained report.html from run dirs")
    report.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="one or more results/<run_id> folders (side by side)")
    report.add_argument("--out", metavar="DIR", help="report folder (default: reports/<RUN_DIR name>[-vs-<name>...])")
    report.add_argument("--baseline", default="torch", help="framework the speedups are relative to (default torch)")

    profile = commands.add_parser(
        "profile", help="per-stage and per-op time, FLOP check and traces from each framework's profiler",
        epilog=_PROFILE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    what = profile.add_argument_group("what to profile (as for run)")
    _add_model_arguments(what)
    what.add_argument("--phase", metavar="LIST", help="forward, forward_backward or all (default: both)")
    what.add_argument("--batch-size", metavar="N", help="one batch size (default: 1 on a CPU, 16 on a GPU)")
    what.add_argument("--execution", metavar="LIST", help="default, all (default) or a comma list, as for run")
    what.add_argument("--impl", metavar="LIST",
                      help="the implementation variant: idiomatic (default) or tuned, one per framework "
                      "(framework:variant items, as for run)")  # fmt: skip
    what.add_argument("--precision", help="fp32 (default), bf16 or fp64")
    what.add_argument("--device", help="auto (default: gpu when one is visible), cpu or gpu")
    how = profile.add_argument_group("how to profile")
    how.add_argument("--warmup", metavar="N", help="untimed steps before profiling (default as for run)")
    how.add_argument("--steps", metavar="N", help="profiled steps per cell (default 5)")
    how.add_argument("--top-k", metavar="N", help="ops listed per cell, by self time (default 15)")
    how.add_argument("--timeout", metavar="SECONDS", help="per cell, from worker start (default 900)")
    where = profile.add_argument_group("where results go")
    where.add_argument("--out", metavar="DIR", help="results directory (default: results/)")
    return parser


_COMPARE_EPILOG = """\
verdict: slower when the bootstrap 95% CI of the ratio of medians new/base lies above 1, the Mann-Whitney
p-value is below 0.01 and the ratio exceeds 1 + threshold; faster likewise; else unchanged. Parameter
counts, FLOPs and equivalence errors must match, and the new run must be whole: a cell ok in the base
but failed or missing in the new run, or a new run that is not complete, fails (--allow-partial: warns).
When both runs have several rounds (bench run --rounds) the CI resamples rounds too and the rank test is
not needed. Exit codes: 0 no regression, 1 a cell significantly slower, an invariant mismatch or an
incomplete new run, 2 bad input (missing run, damaged or foreign CSV, different configs, unwritable --json/--csv),
75 the disk filled up writing --json/--csv."""


_MAXBATCH_EPILOG = """\
each probe is one fresh worker that builds the model at a batch size and times a few steps; a probe fits
when it is ok and its peak memory (GPU allocator on a GPU, resident memory on a CPU) is within
--memory-budget. Writes results/<UTC time>-<device>-maxbatch/ (probes.csv, maxbatch.csv, maxbatch.png,
run.json). Exit codes: 0 every search ended on memory or the limit, 1 a probe failed otherwise or nothing
fit, 2 bad input, 130 interrupted (the probes made so far are kept)."""


_PROFILE_EPILOG = """\
one fresh worker per framework x execution x phase runs the implementation's profile(): stage times
(profiler scopes, or one compiled call per stage where XLA fuses across stages), the top ops by self time,
framework-reported vs analytic conv FLOPs, compile figures and trace files. Writes
results/<UTC time>-<device>-profile/ (stages.csv, ops.csv, flops.csv, compile.csv, run.json, traces/).
Exit codes: 0 every cell ok or skipped, 1 a cell failed, timed out, ran out of memory or broke the
profile contract, 2 bad input (an unwritable --out included), 75 the disk filled up, 129/130/143
stopped by SIGHUP/Ctrl-C/SIGTERM (the cells profiled so far are kept)."""


def _profile(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.profile import runner as profile

    options = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    return profile.start(profile.build_profile_settings(**options), argv)


def _compare(args: argparse.Namespace) -> int:
    from bench.regress.compare import CompareError, run_compare

    try:
        files = {"json_path": args.json, "csv_path": args.csv}
        return run_compare(args.base_run, args.new_run, args.metric, args.threshold, args.normalize, **files,
                           allow_partial=args.allow_partial)  # fmt: skip
    except (CompareError, RunDirError) as err:
        raise UsageError(str(err)) from None


def _report(args: argparse.Namespace) -> int:
    from bench.report.run_report import ReportError, run

    try:
        return run(args.run_dirs, args.out, args.baseline)
    except (ReportError, RunDirError) as err:
        raise UsageError(str(err)) from None


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    """`run`: a new run, a resumed one (--resume) or a replay of a recorded one (--like); then its report."""
    from bench.run import runner

    options = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "no_report", "run_id", "like") and v is not None}
    try:
        if args.like is not None:
            result = runner.start(_like_settings(args, options), argv, run_id=args.run_id)
        elif args.resume is not None:
            if options or args.run_id is not None:
                flags = ", ".join("--" + k.replace("_", "-") for k in [*options, *(["run_id"] if args.run_id else [])])
                raise UsageError(f"--resume takes every setting from RUN_DIR/run.json; drop {flags}")
            result = runner.resume(Path(args.resume), argv)
        else:
            result = runner.start(build_settings(**options), argv, run_id=args.run_id)
    except RunDirError as err:
        raise UsageError(str(err)) from None
    if not args.no_report and not result.interrupted:
        from bench.report.run_report import write_after_run

        write_after_run(result.run_dir)
    return result.exit_code


def _like_settings(args: argparse.Namespace, options: dict) -> RunSettings:
    """RUN_DIR's recorded settings for a new run; only where the results go may differ."""
    from bench.core.rundir import read_record
    from bench.run.runner import settings_from_record

    extra = [k for k in options if k not in ("out", "rounds", "timing_only")] + (["resume"] if args.resume is not None else [])
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise UsageError(f"--like takes every measurement setting from RUN_DIR/run.json; drop {flags} (only --out, --run-id, --rounds, --timing-only and --no-report may be given)")
    recorded = dict(read_record(Path(args.like))["settings"])
    if "rounds" in options:  # the same cells in another number of processes: what the coverage experiment varies
        recorded["rounds"] = parse_positive_int("--rounds", options["rounds"])
    if options.get("timing_only"):
        recorded["checks"] = False
    return settings_from_record({**recorded, "out_dir": options.get("out", "results")}, f"--like: {args.like}/run.json")


def _maxbatch(args: argparse.Namespace, argv: list[str]) -> int:
    """`maxbatch`: the search, then its figure beside the CSVs."""
    import pandas as pd

    from bench.report import plots
    from bench.run import maxbatch

    search = {"memory_budget", "start", "limit"}
    options = {k: v for k, v in vars(args).items() if k not in {"command", *search} and v is not None}
    settings = build_settings(batch_size="1", **options)  # the batch is what is searched: 1 is a placeholder
    code, run_dir = maxbatch.start(settings, args.memory_budget, args.start, args.limit, argv)
    probes = pd.read_csv(run_dir / "probes.csv")
    if not probes.empty:
        path = plots.maxbatch(probes, run_dir / "maxbatch.png", f"largest batch that fits ({settings.preset}, {settings.device})")
        print(f"figure: {path}")
    return code


def _overhead(args: argparse.Namespace) -> int:
    from bench.core.settings import parse_positive_int
    from bench.run.overhead import measure_overhead

    rounds = parse_positive_int("--rounds", args.rounds)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "rounds") and v is not None}
    return measure_overhead(build_settings(**options), rounds)


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 (one return per command)
    """Parse `argv` (default sys.argv[1:]) and run the command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return _run(args, argv)
        if args.command == "compare":
            return _compare(args)
        if args.command == "report":
            return _report(args)
        if args.command == "overhead":
            return _overhead(args)
        if args.command == "profile":
            return _profile(args, argv)
        if args.command == "maxbatch":
            return _maxbatch(args, argv)
        if args.command == "doctor":
            from bench.run.doctor import run_doctor

            return run_doctor()
        from bench.run import inventory

        if args.command == "list":
            return inventory.list_frameworks(probe_workers=not args.no_probe)
        return inventory.print_environment(argv)
    except (UsageError, SettingsError, OutputPathError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # run and profile handle a full disk themselves (resume hint); this is the rest
        if not is_disk_full(err):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: the disk is full ({err.strerror}{where}); free some space and run the command again", file=sys.stderr)
        return DISK_FULL_EXIT_CODE
