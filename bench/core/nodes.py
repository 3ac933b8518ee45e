"""Which machine ran a cell, and whether two machines are the same kind: node types from environment records.

A row of summary.csv names its `host` and `node_id` (a Ray node's id, or "local" for a run on this machine;
several ids joined by commas when a cell's rounds ran on different nodes). run.json holds each node's
environment record (bench.core.envinfo.collect) under `nodes`, keyed by node id; a local run, and any run
made before the Ray executor existed, has only its `environment`, which stands for node "local".

Two nodes are of one type when what decides their numbers is the same: the CPU model and usable cores, the
GPU models, Python and the versions of the frameworks and the numerical libraries under them. Numbers from
nodes of different types are not comparable cell for cell (bench compare flags them, bench report warns).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

LOCAL_NODE = "local"  # the node id of every row a local run (the default executor) writes
# Distributions whose version changes a cell's numbers; the others envinfo records (pandas, rich) do not.
TYPE_PACKAGES: tuple[str, ...] = (
    "torch", "tensorflow", "tensorflow-cpu", "keras", "jax", "jaxlib", "flax",
    "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
    "nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12", "numpy",
)  # fmt: skip


def node_records(record: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """node id -> environment record of every node a run used: run.json `nodes` (a Ray run, whose
    `environment` is the driver's, which measured nothing), else `environment` as node "local"."""
    nodes = record.get("nodes")
    if isinstance(nodes, Mapping) and nodes:
        return {str(k): v for k, v in nodes.items() if isinstance(v, Mapping) and "error" not in v}
    environment = record.get("environment")
    return {LOCAL_NODE: environment} if isinstance(environment, Mapping) else {}


def row_environment(row: Mapping[str, Any], record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The environment record of the node that ran a row (its first, when its rounds ran on several), or None."""
    return node_records(record).get(row_node_ids(row)[0])


def gpu_names(env: Mapping[str, Any]) -> list[str]:
    """The GPU models NVML saw on a node, sorted (empty on a CPU node or an unreadable record)."""
    gpus = env.get("gpus") or []
    return sorted(str(g.get("name")) for g in gpus if isinstance(g, Mapping) and g.get("name"))


def node_type(env: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two nodes' numbers comparable: CPU model and usable cores, GPUs, Python, framework versions."""
    packages = env.get("packages") if isinstance(env.get("packages"), Mapping) else {}
    return {
        "cpu_model": env.get("cpu_model"),
        "cpu_cores_usable": env.get("cpu_cores_usable"),
        "gpus": gpu_names(env),
        "python": env.get("python"),
        "packages": {name: packages.get(name) for name in TYPE_PACKAGES if packages.get(name) is not None},
    }


def type_label(env: Mapping[str, Any]) -> str:
    """A node type in a few words: 'AMD EPYC 7B13, 2 cores, no GPU, torch 2.13.0, jax 0.10.2'."""
    kind = node_type(env)
    gpus = ", ".join(kind["gpus"]) or "no GPU"
    versions = ", ".join(f"{name} {version}" for name, version in kind["packages"].items() if name != "numpy")
    return f"{kind['cpu_model']}, {kind['cpu_cores_usable']} cores, {gpus}" + (f", {versions}" if versions else "")


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """How two nodes' types differ, one phrase per field ('cpu_model A vs B'); empty when they are one type."""
    left, right = node_type(a), node_type(b)
    found = [f"{key} {left[key]!r} vs {right[key]!r}" for key in ("cpu_model", "cpu_cores_usable", "gpus", "python")
             if left[key] != right[key]]  # fmt: skip
    for name in sorted(set(left["packages"]) | set(right["packages"])):
        if left["packages"].get(name) != right["packages"].get(name):
            found.append(f"{name} {left['packages'].get(name)} vs {right['packages'].get(name)}")
    return found


def row_node_ids(row: Mapping[str, Any]) -> list[str]:
    """The node ids that ran a row ("local" for rows written before rows named their node)."""
    text = str(row.get("node_id") or "").strip()
    if not text or text.lower() == "nan":
        return [LOCAL_NODE]
    return [part for part in text.split(",") if part]


def row_types(rows: Iterable[Mapping[str, Any]], record: Mapping[str, Any]) -> dict[str, list[str]]:
    """type label -> cell ids of the rows that ran on nodes of that type (unknown nodes labelled by their id);
    skipped rows ran nowhere and are left out."""
    envs = node_records(record)
    found: dict[str, list[str]] = {}
    for row in rows:
        if str(row.get("status")) == "skipped":  # never ran anywhere
            continue
        for node in row_node_ids(row):
            env = envs.get(node)
            label = type_label(env) if env is not None else f"node {node} (no environment record in run.json)"
            cells = found.setdefault(label, [])
            if str(row.get("cell_id")) not in cells:
                cells.append(str(row.get("cell_id")))
    return found


def mixed_types_warning(rows: Iterable[Mapping[str, Any]], record: Mapping[str, Any]) -> str | None:
    """A warning when the rows ran on more than one node type, naming each type and how many cells it ran."""
    found = row_types(rows, record)
    if len(found) < 2:
        return None
    parts = "; ".join(f"{label}: {len(cells)} cell(s), e.g. {cells[0]}" for label, cells in found.items())
    return (f"cells ran on {len(found)} different node types ({parts}); timings of cells from different node types "
            "are not comparable: compare cells within one node type (summary.csv columns host and node_id)")


def cluster_warning(envs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """A warning when the nodes that can take cells are not all of one type (the first difference per node)."""
    items = list(envs.items())
    if len(items) < 2:
        return None
    first_id, first = items[0]
    odd = {node: differences(first, env) for node, env in items[1:]}
    odd = {node: diff for node, diff in odd.items() if diff}
    if not odd:
        return None
    detail = "; ".join(f"node {node}: {', '.join(diff)}" for node, diff in odd.items())
    return (f"the cluster's {len(items)} nodes are not all of one type (against node {first_id}: {detail}); cells of "
            "one comparison may run on different hardware or software")
