"""`bench list` and `bench env`: what is installed and what this machine is, printed."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from bench.core import console as out
from bench.core import envinfo, nvml
from bench.core import settings as settings_mod
from bench.engine.launch import run_worker
from bench.engine.protocol import WORKER_ENV, InfoSpec
from impls import FRAMEWORKS

_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "jax": ("jax", "jaxlib", "flax"),
}
PROBE_TIMEOUT_S = 180.0


def framework_versions(framework: str) -> str:
    """'jax 0.4.30, jaxlib 0.4.30, flax 0.8.5' from package metadata (nothing imported)."""
    found = [(name, envinfo.package_version(name)) for name in _DISTRIBUTIONS[framework]]
    return ", ".join(f"{name} {version}" for name, version in found if version)


def probe(framework: str) -> dict[str, Any]:
    """The framework's runtime_info() and devices, asked of a worker process (the parent imports none)."""
    with tempfile.TemporaryDirectory(prefix="hgbench-list-") as workdir:
        outcome = run_worker(
            InfoSpec(framework=framework),
            workdir=Path(workdir),
            name=f"{framework}-info",
            log_path=Path(workdir) / f"{framework}-info.log",
            timeout_s=PROBE_TIMEOUT_S,
        )
    if outcome.status != "ok":
        lines = outcome.error.strip().splitlines()
        return {"error": lines[-1] if lines else outcome.status}
    return dataclasses.asdict(outcome.result)


def list_frameworks(probe_workers: bool = True) -> int:
    """Print every framework: installed or not, versions, executions, devices it sees, install command."""
    console = out.make_console()
    table = Table(title="hgbench frameworks", header_style="bold")
    for column in ("framework", "installed", "versions", "executions", "devices seen", "threads (intra/inter)"):
        table.add_column(column)
    for fw in FRAMEWORKS:
        installed = settings_mod.is_installed(fw)
        executions = ", ".join(settings_mod.EXECUTIONS[fw])
        if not installed:
            table.add_row(fw, "[red]no[/]", escape(f"install with: {settings_mod.install_hint(fw)}"), executions, "", "")
            continue
        devices, threads = "", ""
        if probe_workers:
            info = probe(fw)
            runtime = info.get("runtime_info", {})
            devices = (
                escape(", ".join(map(str, runtime.get("devices", [])))) or f"[red]{escape(info.get('error', '?'))}[/]"
            )
            threads = (
                f"{runtime.get('intra_op_threads', '?')}/{runtime.get('inter_op_threads', '?')}" if runtime else ""
            )
        table.add_row(fw, "[green]yes[/]", framework_versions(fw), executions, devices, threads)
    console.print(table)
    gpus = nvml.gpus()
    console.print(
        "GPUs (NVML): " + (", ".join(f"{g['index']}: {g['name']} ({g['uuid']})" for g in gpus) if gpus else "none")
    )
    return 0


def print_environment(args: list[str]) -> int:
    """Print the environment record that run.json stores, as JSON."""
    print(json.dumps({**envinfo.collect(args), "worker_env": WORKER_ENV}, indent=2))
    return 0
