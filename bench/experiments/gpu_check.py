"""The evidence a GPU machine owes the project, in one command that fits a short lease (about 9 minutes on one
H200 with torch and JAX installed):

    python -m bench.experiments.gpu_check --out results --reports reports

Steps, each a subprocess with its own time limit, its output kept in OUT/gpu-check/<step>.txt:
  1. `bench doctor` (does this machine give trustworthy numbers);
  2. the GPU tests with HGBENCH_REQUIRE_GPU=1 (tests/test_gpu.py and the GPU tests of the equivalence suite);
  3. a seed-preset run of torch and JAX at batch 16, both phases, default executions, every implementation
     variant: fp32 with IEEE math and bf16 (results OUT/gpu-seed-ieee), and its report;
  4. the same cells in fp32, measured in 3 interleaved rounds (worker processes) each, timing only
     (OUT/gpu-seed-rounds): the process-to-process spread on a GPU, which sets the GPU's default --rounds;
  5. fp32 with TF32 (OUT/gpu-seed-tf32) and its report;
  6. a `maxbatch` search for one cell per framework (forward_backward, default execution; its probes.csv
     keeps every probe that finished, so a step stopped by the deadline still leaves its evidence).
A step that fails or runs out of time is recorded and the next one runs; `--deadline` (seconds for all
steps) shortens the later steps' limits so the whole check ends inside a lease. OUT/gpu-check/summary.json
lists every step's command, exit code and wall time. `--preset tiny --device cpu --memory-budget 4GiB` makes a
quick rehearsal of the same steps on a CPU machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.core.files import write_json_atomic
from bench.core.paths import REPO_ROOT


def _steps(args: argparse.Namespace, out: Path, reports: Path) -> list[tuple[str, list[str], dict[str, str], float]]:
    """(name, command, extra environment, time limit in s) of every step."""
    bench = [sys.executable, "-m", "bench"]
    model = ["--preset", args.preset, "--framework", args.frameworks, "--device", args.device, "--execution", "default"]
    # A short timed loop (1 s, at most 200 steps): the lease is short, and on a GPU 1 s is hundreds of steps.
    run = [*bench, "run", *model, "--batch-size", args.batch_size, "--phase", "all", "--warmup", "5", "--min-time", "1",
           "--iters", "200", "--out", str(out), "--no-report"]  # fmt: skip
    budget = ["--memory-budget", args.memory_budget] if args.memory_budget else []
    return [
        ("doctor", [*bench, "doctor"], {}, 45.0),
        ("gpu-tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "tests/test_equivalence.py"],
         {"HGBENCH_REQUIRE_GPU": "1" if args.device == "gpu" else "0"}, 120.0),
        ("seed-ieee", [*run, "--impl", args.impl, "--precision", "fp32,bf16", "--fp32-math", "ieee",
                       "--run-id", "gpu-seed-ieee"], {}, 200.0),
        ("report-ieee", [*bench, "report", str(out / "gpu-seed-ieee"), "--out", str(reports / "gpu-seed-ieee")], {}, 25.0),
        ("seed-rounds", [*run, "--impl", args.impl, "--precision", "fp32", "--fp32-math", "ieee", "--rounds", "3",
                         "--timing-only", "--run-id", "gpu-seed-rounds"], {}, 100.0),
        ("seed-tf32", [*run, "--precision", "fp32", "--fp32-math", "tf32", "--run-id", "gpu-seed-tf32"], {}, 70.0),
        ("report-tf32", [*bench, "report", str(out / "gpu-seed-tf32"), "--out", str(reports / "gpu-seed-tf32")], {}, 25.0),
        ("maxbatch", [*bench, "maxbatch", *model, "--phase", "forward_backward", "--limit", args.limit, *budget,
                      "--out", str(out)], {}, 90.0),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run every step; exit 0 when all succeeded, 1 otherwise (each step's outcome is in summary.json)."""
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results", help="results folder (default %(default)s)")
    parser.add_argument("--reports", default="reports", help="reports folder (default %(default)s)")
    parser.add_argument("--preset", default="seed", help="model preset (default %(default)s)")
    parser.add_argument("--frameworks", default="torch,jax", help="frameworks (default %(default)s)")
    parser.add_argument("--device", default="gpu", help="gpu (default) or cpu for a rehearsal")
    parser.add_argument("--batch-size", default="16", help="batch of the seed runs (default %(default)s)")
    parser.add_argument("--limit", default="1024", help="largest batch maxbatch tries (default %(default)s)")
    parser.add_argument("--memory-budget", default=None, help="maxbatch's budget (needed with --device cpu)")
    parser.add_argument("--impl", default="all", help="implementation variants of the seed runs (default %(default)s)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for all steps together; a step's limit shrinks to what is left, and a step "
                             "with under 10 s left is skipped (exit code 124 in summary.json)")
    args = parser.parse_args(argv)
    out, reports = Path(args.out), Path(args.reports)
    log_dir = out / "gpu-check"
    log_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": []}
    failed = False
    check_start = time.perf_counter()
    for name, command, extra_env, step_limit_s in _steps(args, out, reports):
        limit_s = step_limit_s
        if args.deadline is not None:
            limit_s = min(step_limit_s, args.deadline - (time.perf_counter() - check_start))
            if limit_s < 10:
                print(f"- [{name}] skipped: {max(limit_s, 0):.0f} s left of the {args.deadline:.0f} s deadline", flush=True)
                summary["steps"].append({"step": name, "command": command, "exit_code": 124, "wall_s": 0.0,  # type: ignore[union-attr]
                                         "skipped": "deadline"})
                failed = True
                continue
        print(f"+ [{name}, at most {limit_s:.0f} s] {' '.join(command)}", flush=True)
        started = time.perf_counter()
        with open(log_dir / f"{name}.txt", "w") as log:
            try:
                code = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **extra_env}, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=limit_s, check=False).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                code = 124
        wall_s = time.perf_counter() - started
        failed |= code != 0
        summary["steps"].append({"step": name, "command": command, "exit_code": code, "wall_s": round(wall_s, 1)})  # type: ignore[union-attr]
        print(f"  exit {code} after {wall_s:.0f} s (log: {log_dir / (name + '.txt')})", flush=True)
        write_json_atomic(log_dir / "summary.json", summary)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
