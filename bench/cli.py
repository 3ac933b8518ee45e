"""Command line: `python -m bench run|list|env`. Parsing only; each command is a plain function elsewhere.

A user's mistake ends as one line on stderr ("error: ...") and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.settings import CONFIG_FLAGS, SettingsError, build_settings


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
out or ran out of memory (or a framework disagreed in the equivalence check), 2 bad input."""


def build_parser() -> argparse.ArgumentParser:
    """The parser for every command (built when main() runs, not at import)."""
    parser = _Parser(prog="python -m bench", description="Benchmark the Stacked Hourglass implementations.")
    commands = parser.add_subparsers(dest="command", metavar="{run,list,env,overhead}", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser(
        "run", help="measure cells and write results/<run_id>/", epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    what = run.add_argument_group("what to measure")
    what.add_argument("--framework", metavar="LIST", help="all (default) or a comma list: torch,tensorflow,jax")
    what.add_argument("--preset", help="model preset: seed (default), newell or tiny")
    for flag, field in CONFIG_FLAGS.items():
        what.add_argument(f"--{flag}", metavar="N", help=f"override the preset's {field}")
    what.add_argument("--input-size", metavar="HxW", help="override the input size: 256 or 256x192")
    what.add_argument("--batch-size", metavar="LIST", help="comma list of batch sizes, e.g. 1,8,16")
    what.add_argument("--phase", metavar="LIST", help="forward, forward_backward or all (default: both)")
    what.add_argument("--execution", metavar="LIST",
                      help="default, all, or a comma list of modes (eager, compile, function, xla, jit) "
                      "or framework:mode items such as torch:compile")  # fmt: skip
    what.add_argument("--precision", metavar="LIST", help="fp32 (default), bf16 or fp32,bf16")
    what.add_argument("--device", help="auto (default: gpu when one is visible), cpu or gpu")
    what.add_argument("--protocol", help="default, or seed: the seed's loop (batch 16, 10 burn-in, 100 timed)")
    how = run.add_argument_group("how to measure")
    how.add_argument("--warmup", metavar="N", help="untimed calls after the separately timed first call")
    how.add_argument("--iters", metavar="N", help="timed iterations: exactly N, or at most N with --min-time")
    how.add_argument("--min-time", metavar="SECONDS", help="time iterations until this much time has passed")
    how.add_argument("--timeout", metavar="SECONDS", help="per cell, from worker start (default 900)")
    where = run.add_argument_group("where results go")
    where.add_argument("--out", metavar="DIR", help="results directory (default: results/)")
    where.add_argument("--resume", metavar="RUN_DIR", help="complete an interrupted run with its recorded settings")

    lister = commands.add_parser("list", help="frameworks (installed or not), versions and devices")
    lister.add_argument(
        "--no-probe", action="store_true", help="do not start a worker per framework to ask for its devices"
    )
    commands.add_parser("env", help="print the environment record that run.json stores")

    overhead = commands.add_parser("overhead", help="harness loop vs a bare loop on one cell's model (same process)")
    for flag, default in (("--framework", "torch"), ("--preset", "seed"), ("--phase", "forward"), ("--execution", "default"),
                          ("--precision", "fp32"), ("--batch-size", None), ("--device", None), ("--warmup", "3"), ("--iters", "5")):  # fmt: skip
        overhead.add_argument(
            flag, default=default, help=f"as for run (default: {default or 'as for run'}); the first cell is used"
        )
    overhead.add_argument(
        "--rounds", default="20", help="alternating rounds of --iters calls each, harness then bare loop (default 20)"
    )
    return parser


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from bench import orchestrate

    options = {k: v for k, v in vars(args).items() if k not in ("command", "resume") and v is not None}
    if args.resume is not None:
        if options:
            flags = ", ".join("--" + k.replace("_", "-") for k in options)
            raise UsageError(f"--resume takes every setting from RUN_DIR/run.json; drop {flags}")
        run_dir = Path(args.resume)
        if not (run_dir / "run.json").is_file():
            raise UsageError(
                f"--resume: {str(run_dir)!r} is not a run directory (no run.json in it); give one such as results/<run_id>"
            )
        return orchestrate.resume(run_dir, argv)
    settings = build_settings(**options)
    return orchestrate.start(settings, argv)


def _overhead(args: argparse.Namespace) -> int:
    from bench.overhead import measure_overhead
    from bench.settings import parse_positive_int

    rounds = parse_positive_int("--rounds", args.rounds)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "rounds") and v is not None}
    return measure_overhead(build_settings(**options), rounds)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run the command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return _run(args, argv)
        if args.command == "overhead":
            return _overhead(args)
        from bench import inventory

        if args.command == "list":
            return inventory.list_frameworks(probe_workers=not args.no_probe)
        return inventory.print_environment(argv)
    except (UsageError, SettingsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
