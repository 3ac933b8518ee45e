"""Do the data-parallel steps compute what they should? Checked before timing, in float64.

For every device count above 1 and every framework variant of the run, one worker runs the framework's
data-parallel step (impls/<framework>_data_parallel.py) on the canonical weights and a global batch of
N x the smallest train batch, and the same step shard by shard on one device
(impls.data_parallel.shardwise_reference: per-replica batch norm, replica-mean loss and gradient). Each
framework's data-parallel gradient is compared with its own shard-by-shard reference and with the other
frameworks' data-parallel gradients (bench.run.gradients' rule and tolerance). Recorded in run.json under
"data_parallel_check"; a disagreement fails the run (exit 1) like the single-device gradient check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bench.core import console as out
from bench.core.settings import variant_key
from bench.engine.protocol import DataParallelCheckResult, DataParallelCheckSpec
from bench.run import gradients
from impls.base import smallest_train_batch
from impls.registry import DATA_PARALLEL_EXECUTIONS

PRECISION = gradients.GRADIENT_PRECISION  # float64: correct engines agree to rounding, so a 1e-8 rule is sharp
RTOL = gradients.GRADIENT_RTOL


def entry_key(variant: str, devices: int) -> str:
    """How run.json names one variant's check on `devices` devices ("torch d2", "jax-tuned d2")."""
    return f"{variant} d{devices}"


def _execution(runner: Any, framework: str) -> str:
    """The execution the check builds: the run's first one the data-parallel engine supports, else its default."""
    supported = DATA_PARALLEL_EXECUTIONS[framework]
    chosen = [e for e in runner.settings.executions[framework] if e in supported]
    return (chosen or list(supported))[0]


def check(runner: Any, progress: Any, task: Any) -> dict[str, Any]:
    """Run every check (one worker per variant and device count) and return run.json's record of them."""
    s = runner.settings
    per_replica = smallest_train_batch(s.config)
    entries: dict[str, dict[str, Any]] = {}
    for n in (n for n in s.devices if n > 1):
        grads: dict[str, dict[str, np.ndarray]] = {}
        losses: dict[str, float] = {}
        for fw, impl in runner._variants():
            key = variant_key(fw, impl)
            name = entry_key(key, n)
            progress.update(task, description=f"{key}: data-parallel check on {n} devices ({PRECISION})")
            execution = _execution(runner, fw)
            output = runner.session.workdir / f"dp_{key}_d{n}.npz"
            reference = runner.session.workdir / f"dp_{key}_d{n}_reference.npz"
            spec = DataParallelCheckSpec(framework=fw, execution=execution, precision=PRECISION, batch_size=n * per_replica,
                                         devices=n, output_npz=str(output), reference_npz=str(reference), impl=impl,
                                         **runner._placement())  # fmt: skip
            outcome = runner.session.call(spec, f"{key}-d{n}-data-parallel-check")
            result = outcome.result
            assert isinstance(result, DataParallelCheckResult)
            entry: dict[str, Any] = {"status": outcome.status, "error": outcome.error, "framework": fw, "impl": impl,
                                     "execution": execution, "devices": n, "batch_size": n * per_replica,
                                     "precision": PRECISION, "loss": result.loss, "reference_loss": result.reference_loss}  # fmt: skip
            entries[name] = entry
            if outcome.status != "ok" or result.loss is None or result.reference_loss is None:
                continue
            with np.load(output) as saved, np.load(reference) as wanted:
                got = {p: saved[p] for p in saved.files}
                error, where = gradients.gradient_error(got, {p: wanted[p] for p in wanted.files})
            loss_error = abs(result.loss - result.reference_loss) / (abs(result.reference_loss) or 1.0)
            entry.update(reference_max_rel_err=error, reference_worst_parameter=where, reference_loss_rel_err=loss_error)
            grads[key], losses[key] = got, result.loss
        for key, verdict in gradients.compare(grads, losses, RTOL).items():
            entry = entries[entry_key(key, n)]
            entry.update(cross_max_rel_err=verdict["max_rel_err"], cross_loss_rel_err=verdict["loss_rel_err"],
                         cross_worst_parameter=verdict["worst_parameter"], cross_reference=verdict["reference"])  # fmt: skip
        for key in grads:
            entry = entries[entry_key(key, n)]
            errors = [e for e in (entry.get("reference_max_rel_err"), entry.get("reference_loss_rel_err"),
                                  entry.get("cross_max_rel_err"), entry.get("cross_loss_rel_err")) if e is not None]  # fmt: skip
            entry["max_rel_err"] = max(errors)
            entry["equivalent"] = bool(entry["max_rel_err"] <= RTOL)
    return {
        "rtol": RTOL,
        "precision": PRECISION,
        "rule": "per parameter ||a - b|| / (||b|| + 1e-4 x typical) (bench.run.gradients) against the framework's "
                "own shard-by-shard reference on one device and against the other frameworks' data-parallel "
                "gradients; losses relative; every figure <= rtol",
        "inputs": f"impls.spec.random_batch(config, devices x {per_replica}, seed={s.seed}), split in contiguous "
                  "shards, one per replica",
        "weights": "impls.init_weights(config, seed=0)",
        "batch_norm": "per-replica batch statistics (each framework's default under data parallelism)",
        "frameworks": entries,
    }  # fmt: skip


def entries(record: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The check's entries keyed for bench.run.runner.exit_code (a failed or disagreeing one fails the run)."""
    found = (record.get("data_parallel_check") or {}).get("frameworks", {})
    return {f"{name} data-parallel": entry for name, entry in found.items()}


def announce(console: Any, record: Mapping[str, Any]) -> None:
    """One console line of every check's largest error; an alarm for each that failed or disagreed."""
    found = record.get("frameworks", {})
    for name, entry in found.items():
        if entry["status"] != "ok":
            last = (entry.get("error") or "").splitlines()[-1:] or [""]
            out.alarm(console, f"DATA-PARALLEL CHECK {str(entry['status']).upper()}: {name}",
                      f"{name}: the data-parallel step could not be checked: {last[0]}")  # fmt: skip
        elif entry.get("equivalent") is False:
            out.alarm(console, f"DATA-PARALLEL GRADIENTS DISAGREE: {name}",
                      f"{name}: largest error {entry['max_rel_err']:.3g} > {RTOL:g} (own shard-by-shard reference "
                      f"{entry.get('reference_max_rel_err', float('nan')):.3g} at {entry.get('reference_worst_parameter')}, "
                      f"other frameworks {entry.get('cross_max_rel_err') or float('nan'):.3g}). Its timings are "
                      "recorded, but its data-parallel step is not the same computation.")  # fmt: skip
    checked = {name: e["max_rel_err"] for name, e in found.items() if e.get("max_rel_err") is not None}
    if checked:
        text = ", ".join(f"{name} {err:.1e}" for name, err in checked.items())
        console.print(f"data-parallel gradients ({PRECISION}, vs shard-by-shard reference and across frameworks): {text}")
