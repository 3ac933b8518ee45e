"""The report's data-parallel section: scaling per multi-device cell, and the check of its gradients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from bench.core.numbers import fmt, num
from bench.core.rundir import RunData
from bench.report import plots

TITLE = "Data parallelism (--devices)"
CHECK_TITLE = ("Data-parallel gradients before timing (fp64: each framework's data-parallel step against its own "
               "shard-by-shard reference on one device, and against the other frameworks)")  # fmt: skip
_NOTE = ("Scaling efficiency = images/s on N devices / (N x images/s of the same framework, variant, execution "
         "and precision on one device at the per-device batch); 1 is perfect scaling. Batch norm uses each "
         "replica's own batch statistics in all three frameworks. All-reduce % of step = the time of the "
         "gradient all-reduce ops in the framework's own profile of a few steps after the timed loop, over "
         "the profiled step time: op time, which may overlap compute (the method is in summary.csv).")  # fmt: skip
_CPU_NOTE = (" These cells ran on a CPU: the replicas share the same cores (torch's rank processes split them, "
             "TensorFlow's logical and JAX's host devices run on one thread pool), so the figures show that the "
             "data-parallel step runs and what its coordination costs here, not how it scales on separate devices.")


def note(sections: Mapping[str, pd.DataFrame]) -> str:
    """The section's explanation; on a CPU it says why its scaling figures mean little."""
    scaling = sections.get("scaling", pd.DataFrame())
    on_cpu = not scaling.empty and "device" in scaling and (scaling["device"] == "cpu").any()
    return _NOTE + (_CPU_NOTE if on_cpu else "")


def scaling_display(table: pd.DataFrame, multi: bool) -> pd.DataFrame:
    """One row per multi-device cell: its 1-device twin's images/s beside its own, and the efficiency."""
    rows = []
    ok = table[table["status"] == "ok"]
    for r in plots.sort_cells(table[table["devices"] > 1]).to_dict("records"):
        twin = ok[(ok["run"] == r["run"]) & (ok["framework"] == r["framework"]) & (ok["impl"] == r["impl"])
                  & (ok["execution"] == r["execution"]) & (ok["precision"] == r["precision"])
                  & (ok["phase"] == r["phase"]) & (ok["devices"] == 1)
                  & (ok["batch_size"] == int(r["batch_size"]) // int(r["devices"]))]  # fmt: skip
        rows.append({
            **({"run": r["run"]} if multi else {}),
            "cell": r["cell_id"], "status": r["status"], "device": r.get("device", ""),
            "devices": int(r["devices"]), "global batch": int(r["batch_size"]),
            "per-device batch": int(r["batch_size"]) // int(r["devices"]),
            "median ms": fmt(r["latency_ms_median"], ".2f"),
            "images/s": fmt(r["throughput_img_per_s"], ".1f"),
            "1 device images/s": fmt(twin["throughput_img_per_s"].iloc[0], ".1f") if not twin.empty else "not measured",
            "scaling efficiency": fmt(r.get("scaling_efficiency"), ".2f"),
            "all-reduce % of step": fmt(num(r.get("allreduce_share")) * 100, ".0f"),
        })  # fmt: skip
    return pd.DataFrame(rows)


def check_display(runs: Sequence[RunData]) -> pd.DataFrame:
    """One row per framework variant and device count that a run checked before timing."""
    rows = []
    for run in runs:
        check = run.record.get("data_parallel_check") or {}
        for name, e in (check.get("frameworks") or {}).items():
            rows.append({
                **({"run": run.label} if len(runs) > 1 else {}),
                "check": name, "status": e.get("status", ""), "execution": e.get("execution", ""),
                "global batch": e.get("batch_size", ""),
                "vs own reference": fmt(e.get("reference_max_rel_err"), ".2e"),
                "vs other frameworks": fmt(e.get("cross_max_rel_err"), ".2e"),
                "compared with": e.get("cross_reference", ""),
                "tolerance": fmt(check.get("rtol"), "g"),
                "agrees": {True: "yes", False: "NO"}.get(e.get("equivalent"), ""),
            })  # fmt: skip
    return pd.DataFrame(rows)
