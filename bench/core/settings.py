"""What a run measures: the frozen RunSettings, parsed and validated from the command line's strings.

Every user mistake becomes a SettingsError whose message names the flag, the value given and the fix;
the CLI prints it on one line and exits 2. Defaults depend on the device (see `_DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bench.core import nvml
from impls import FRAMEWORKS, PHASES, ConfigError, HourglassConfig, get_preset, install_command, is_installed
from impls.base import FP32_MATH, PRECISIONS, smallest_train_batch
from impls.registry import (
    DATA_PARALLEL_EXECUTIONS,
    DEFAULT_IMPL,
    EXECUTIONS,
    IMPL_PHASES,
    IMPLS,
    UnknownFrameworkError,
    canonical_name,
)

DEVICES: tuple[str, ...] = ("auto", "cpu", "gpu")
PROTOCOLS: tuple[str, ...] = ("default", "seed")
CONFIG_FLAGS: dict[str, str] = {  # CLI option -> HourglassConfig field
    "stacks": "num_stacks",
    "depth": "depth",
    "channels": "channels",
    "keypoints": "num_keypoints",
}

MAX_ITERS = 10_000  # cap on timed iterations when only --min-time bounds the loop
MIN_ITERS = 5  # a time budget still collects this many samples, so the spread means something
EQUIVALENCE_RTOL = 1e-3  # fp32 heatmaps of the seed preset agree to ~1e-5; 1e-3 flags real disagreement
DATA_PARALLEL_PHASE = "forward_backward"  # data parallelism measures the training step
EXECUTORS: tuple[str, ...] = ("local", "ray")  # where workers run (bench.engine.executor)
RAY_INSTALL = "pip install '.[ray]'"
RAY_MISSING = f"--executor ray needs Ray, which is not installed; install it with: {RAY_INSTALL}"


@dataclass(frozen=True)
class _Defaults:
    """What a plain `python -m bench run` measures on one kind of device."""

    batch_sizes: tuple[int, ...]
    executions: dict[str, tuple[str, ...]]
    warmup: int
    iters: int | None
    min_time_s: float | None
    rounds: int  # worker processes per cell, interleaved over all cells
    impls: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(IMPLS))
    # The default run measures each non-default variant in its framework's fastest execution only (where the
    # variant's changes are meant to run), so that every variant fits in a run of under 10 minutes on a
    # 2-core CPU; `--impl all` measures every variant in every execution.
    variant_executions: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(_TUNED_EXECUTIONS))


# "framework:variant" -> the executions the default run measures it in. Torch: eager (its tuned forward folds
# batch norms into convolutions; under torch.compile the first calls alone cost minutes on a 2-core CPU).
# TensorFlow: function (its tuned changes act outside XLA: under jit_compile both formulations compile
# alike, README "Implementation variants"). JAX: jit, its only execution.
_TUNED_EXECUTIONS: dict[str, tuple[str, ...]] = {
    "torch:tuned": ("eager",),
    "tensorflow:tuned": ("function",),
    "jax:tuned": ("jit",),
}

_DEFAULTS: dict[str, _Defaults] = {
    # 2-core CPU: batch 1 of the seed model is ~13.6 GFLOP forward, 0.07-0.5 s per step, and every cell pays
    # process start, import, build and compile. Every framework's execution modes are measured, compiled
    # ones included, so no framework is compared without its fastest mode: on an idle 2-core machine
    # torch.compile's first call costs ~30 s (forward) and ~110 s (forward_backward), XLA's 5-22 s, and the
    # whole default run takes about 6 minutes, leaving room for a busy machine within 10.
    # TensorFlow's eager mode is left out of the CPU default (`--execution all` or tensorflow:eager measures
    # it): TensorFlow users run their models as tf.function graphs (Keras compiles them), eager is a
    # debugging mode 3-5x slower here, and its ~40 s made room for the tuned variants within 10 minutes.
    "cpu": _Defaults(
        batch_sizes=(1,),
        executions={fw: tuple(ex for ex in EXECUTIONS[fw] if (fw, ex) != ("tensorflow", "eager")) for fw in EXECUTIONS},
        warmup=2,
        iters=30,
        min_time_s=3.0,
        rounds=1,
    ),
    # GPU: the seed's batch of 16, every execution, a warm-up long enough for autotuning, and three rounds:
    # on an H200 (results/20261130-h200-*) one process's 95% interval missed what the next process measured
    # (torch eager forward_backward 65.2-67.5 ms in one process, 76.9-83.9 ms medians in four others; JAX
    # jit forward 17.4-18.4 ms, then 19.1 and 19.3), while a worker there costs seconds, not minutes.
    "gpu": _Defaults(batch_sizes=(16,), executions=dict(EXECUTIONS), warmup=10, iters=500, min_time_s=3.0, rounds=3),
}

# `--protocol seed`: the seed's loop exactly: batch 16, 10 untimed burn-in calls (our first call plus 9
# warm-ups), 100 timed calls, on the seed preset.
_SEED_PROTOCOL = {"preset": "seed", "batch_sizes": (16,), "warmup": 9, "iters": 100, "min_time_s": None}


@dataclass(frozen=True)
class LoopSettings:
    """How a worker times a step (bench.engine.timing.measure takes these as its keyword arguments)."""

    warmup: int  # untimed calls after the separately timed first call
    max_iters: int  # at most this many timed calls; exactly this many when min_time_s is None
    min_time_s: float | None  # time calls until this much loop time has passed ...
    min_iters: int  # ... and at least this many calls are done


class SettingsError(ValueError):
    """A command-line value is invalid; the message names the flag, the value and the fix."""


@dataclass(frozen=True)
class Cell:
    """One measurement: a framework's implementation variant in one execution mode, at one precision, batch
    size and phase."""

    framework: str
    execution: str
    precision: str
    batch_size: int
    phase: str
    impl: str = DEFAULT_IMPL
    devices: int = 1  # data-parallel replicas; batch_size is the global batch, split evenly over them

    @property
    def cell_id(self) -> str:
        """Stable key of the cell in CSVs, logs and resume. The default variant and one device are not named,
        so cells of runs made before variants and data parallelism existed keep their ids and stay
        comparable: "tensorflow-function-fp32-b1-forward" is the idiomatic variant on one device,
        "tensorflow-tuned-function-fp32-b1-forward" the tuned one, "torch-eager-fp32-d2-b4-forward_backward"
        a global batch of 4 over 2 devices."""
        devices = f"d{self.devices}-" if self.devices > 1 else ""
        return (f"{variant_key(self.framework, self.impl)}-{self.execution}-{self.precision}-{devices}"
                f"b{self.batch_size}-{self.phase}")  # fmt: skip

    @property
    def per_device_batch(self) -> int:
        """Images each replica computes per step."""
        return self.batch_size // self.devices

    def to_dict(self) -> dict[str, object]:
        """Plain dict for JSON and CSV rows."""
        return dataclasses.asdict(self)


def variant_key(framework: str, impl: str) -> str:
    """How a run names one framework's variant in its checks and tables: the framework for the default
    variant (as before variants existed), "framework-impl" for another ("jax-tuned")."""
    return framework if impl == DEFAULT_IMPL else f"{framework}-{impl}"


@dataclass(frozen=True)
class RunSettings:
    """Everything a run measures and how; frozen, so what was measured is kept apart from the measurement."""

    frameworks: tuple[str, ...]  # in FRAMEWORKS order; may include ones not installed (then skipped)
    framework_selection: str  # "all" or the explicit list as given, so skipping is only done under "all"
    preset: str
    config: HourglassConfig
    batch_sizes: tuple[int, ...]
    phases: tuple[str, ...]
    executions: Mapping[str, tuple[str, ...]]  # per framework, in that framework's order
    precisions: tuple[str, ...]
    device: str  # "cpu" or "gpu", resolved from --device
    device_requested: str  # what --device said: auto, cpu or gpu
    warmup: int  # untimed calls after the (separately timed) first call
    iters: int | None  # at most this many timed calls; exactly this many when min_time_s is None
    min_time_s: float | None  # time calls until this much time has passed (at least MIN_ITERS calls)
    timeout_s: float  # per cell, worker start to result
    out_dir: str
    protocol: str = "default"
    rounds: int = 1  # worker processes per cell (runs recorded before rounds existed had one)
    fp32_math: str = "ieee"  # GPU fp32 convolutions and matmuls: ieee (full fp32) or tf32; a CPU is always ieee
    autotune: bool = True  # cuDNN / XLA autotuning on a GPU, alike in all three frameworks
    seed: int = 0  # seeds inputs, canonical weights and the bootstrap
    equivalence_rtol: float = EQUIVALENCE_RTOL
    # The equivalence and gradient checks and the calibration before timing. False (--timing-only) for
    # repeated runs of cells that another run checked: CI's gate after its first pair of runs.
    checks: bool = True
    # Implementation variants per framework, in that framework's order (impls.registry.IMPLS). Runs recorded
    # before variants existed measured the default one, which an empty mapping stands for.
    impls: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # "framework:variant" -> the only executions that variant is measured in (the default run's choice, see
    # _TUNED_EXECUTIONS); a variant not named here runs in every execution of its framework.
    variant_executions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Data-parallel device counts (--devices). One device measures every phase as before; more measure the
    # forward_backward phase in each framework's own data-parallel engine, in the executions it supports there.
    devices: tuple[int, ...] = (1,)
    # True when --batch-size was not given and some count is above 1: batch_sizes are then per-device batches
    # and a cell on N devices takes a global batch of N x that (weak scaling, so scaling_efficiency has its
    # 1-device twin); False: batch_sizes are global batches, each split over N.
    batch_per_device: bool = False
    # Where the workers run: "local" (this machine, one at a time) or "ray" (tasks of a Ray cluster, one per
    # measurement slot: bench.engine.ray_executor). Runs recorded before executors existed ran locally.
    executor: str = "local"
    ray_address: str = ""  # --ray-address as given ("" = Ray's own rule, else a local cluster)

    def impls_of(self, framework: str) -> tuple[str, ...]:
        """The variants measured for `framework`: its entry in `impls`, else the default variant alone."""
        return tuple(self.impls.get(framework, (DEFAULT_IMPL,)))

    def cells(self) -> list[Cell]:
        """Every cell of the run, in a stable order: devices, framework, variant, execution, precision, batch,
        phase. On more than one device only the forward_backward phase, in the executions the framework's
        data-parallel engine supports (impls.registry.DATA_PARALLEL_EXECUTIONS)."""
        cells = []
        for n in self.devices:
            phases = self.phases if n == 1 else tuple(ph for ph in self.phases if ph == DATA_PARALLEL_PHASE)
            batches = tuple(b * n for b in self.batch_sizes) if self.batch_per_device else self.batch_sizes
            for fw in self.frameworks:
                executions = self.executions[fw] if n == 1 else tuple(
                    ex for ex in self.executions[fw] if ex in DATA_PARALLEL_EXECUTIONS[fw])
                for impl in self.impls_of(fw):
                    chosen = self.executions_of(fw, impl, executions)
                    differs = IMPL_PHASES.get((fw, impl), phases)  # phases where the variant's code is its own
                    cells += [Cell(fw, ex, pr, bs, ph, impl, n)
                              for ex, pr, bs, ph in itertools.product(chosen, self.precisions, batches, phases)
                              if ph in differs]  # fmt: skip
        return cells

    def executions_of(self, framework: str, impl: str, executions: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The executions `impl` of `framework` is measured in: `executions` (default: the framework's),
        narrowed to variant_executions' entry for it where there is one."""
        executions = tuple(self.executions[framework]) if executions is None else executions
        only = self.variant_executions.get(f"{framework}:{impl}")
        return executions if only is None else tuple(ex for ex in executions if ex in only)

    def placement(self) -> dict[str, Any]:
        """What every worker of this run is told besides its own cell: the network, where, the seed, the math."""
        return {"config": self.config.to_dict(), "device": self.device, "device_requested": self.device_requested,
                "seed": self.seed, "fp32_math": self.fp32_math, "autotune": self.autotune}  # fmt: skip

    def loop(self) -> LoopSettings:
        """The timing loop every cell and calibration worker of this run uses."""
        timed = self.min_time_s is not None
        return LoopSettings(self.warmup, self.iters or MAX_ITERS, self.min_time_s, MIN_ITERS if timed else 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (run.json), readable back by `from_dict`."""
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        d["executions"] = {fw: list(ex) for fw, ex in self.executions.items()}
        d["impls"] = {fw: list(self.impls_of(fw)) for fw in self.frameworks}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSettings:
        """Inverse of `to_dict` (used by --resume)."""
        fields = dict(d)
        config = dict(fields["config"])
        config["input_hw"] = tuple(config["input_hw"])
        fields["config"] = HourglassConfig(**config)
        fields["executions"] = {fw: tuple(ex) for fw, ex in fields["executions"].items()}
        fields["impls"] = {fw: tuple(v) for fw, v in fields.get("impls", {}).items()}
        # Commits 7f180ee-56bbce8 recorded an always-empty variant_executions too: empty means no narrowing.
        fields["variant_executions"] = {key: tuple(v) for key, v in fields.get("variant_executions", {}).items()}
        for key in ("frameworks", "batch_sizes", "phases", "precisions", "devices"):
            if key not in fields:  # "devices": runs recorded before data parallelism
                continue
            fields[key] = tuple(fields[key])
        return cls(**fields)


def execution_rank(framework: str, execution: str) -> int:
    """Position of `execution` in the framework's declared order (unknown ones last), for sorting tables."""
    order = EXECUTIONS.get(framework, ())
    return order.index(execution) if execution in order else len(order)


# ---------------------------------------------------------------- parsing of single values and lists


def _items(flag: str, text: str, example: str) -> list[str]:
    """Comma list -> stripped items; an empty item (a stray comma) is a malformed list."""
    items = [item.strip() for item in str(text).split(",")]
    if not text or not str(text).strip() or any(not item for item in items):
        raise SettingsError(f"{flag} must be a comma-separated list such as {example}, got {text!r}")
    return list(dict.fromkeys(items))  # drop repeats, keep order


def parse_positive_int(flag: str, text: str, minimum: int = 1) -> int:
    """An integer >= `minimum` (1 for sizes and counts, 0 for --warmup)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SettingsError(f"{flag} must be {kind}, got {text!r}")
    return value


def parse_positive_float(flag: str, text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{flag} must be a positive number of seconds, got {text!r}")
    return value


def parse_int_list(flag: str, text: str) -> tuple[int, ...]:
    """'1,8,16' -> (1, 8, 16); every item a positive integer."""
    items = _items(flag, text, "1,8,16")
    return tuple(parse_positive_int(flag, item) for item in items)


def parse_choices(flag: str, text: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """A comma list of names from `choices`, or 'all'; returned in `choices` order."""
    items = _items(flag, text, ",".join(choices))
    if items == ["all"]:
        return choices
    for item in items:
        if item not in choices:
            raise SettingsError(f"{flag}: unknown value {item!r}; choose from {', '.join(choices)} or all")
    return tuple(c for c in choices if c in items)


def parse_frameworks(text: str) -> tuple[str, ...]:
    """'all' or a comma list of framework ids/aliases -> ids in FRAMEWORKS order."""
    items = _items("--framework", text, "torch,jax")
    if [i.lower() for i in items] == ["all"]:
        return FRAMEWORKS
    if "all" in (i.lower() for i in items):
        raise SettingsError(f"--framework: 'all' stands alone; give all or a list such as torch,jax, got {text!r}")
    try:
        chosen = {canonical_name(item) for item in items}
    except UnknownFrameworkError as err:
        raise SettingsError(f"--framework: {err}, or all") from None
    return tuple(fw for fw in FRAMEWORKS if fw in chosen)


def _parse_per_framework(flag: str, text: str, frameworks: tuple[str, ...], table: Mapping[str, tuple[str, ...]],
                         noun: str, example: str) -> dict[str, tuple[str, ...]]:
    """'default', 'all', or a comma list of 'name' (every framework that has it) and 'framework:name', where
    each framework's choices are `table[framework]`, its default first; `noun` names one choice in messages."""
    items = _items(flag, text, example)
    if items == ["default"]:
        return {fw: table[fw][:1] for fw in frameworks}
    if items == ["all"]:
        return {fw: table[fw] for fw in frameworks}
    wanted: dict[str, set[str]] = {fw: set() for fw in frameworks}
    known = sorted({name for fw in frameworks for name in table[fw]})
    for item in items:
        fw_text, _, name = item.rpartition(":")
        if fw_text:
            try:
                fw = canonical_name(fw_text)
            except UnknownFrameworkError as err:
                raise SettingsError(f"{flag}: {err}") from None
            if fw not in frameworks:
                raise SettingsError(f"{flag} {item!r} names {fw}, which is not in --framework; add it there or drop it")
            name = table[fw][0] if name == "default" else name
            if name not in table[fw]:
                raise SettingsError(f"{flag}: {fw} has no {noun} {name!r}; choose from {', '.join(table[fw])}")
            wanted[fw].add(name)
            continue
        if name == "default":
            for fw in frameworks:
                wanted[fw].add(table[fw][0])
            continue
        owners = [fw for fw in frameworks if name in table[fw]]
        if not owners:
            raise SettingsError(f"{flag}: unknown {noun} {name!r}; choose from {', '.join(known)}, default or all")
        for fw in owners:
            wanted[fw].add(name)
    for fw in frameworks:
        if not wanted[fw]:
            raise SettingsError(
                f"{flag} {text!r} gives {fw} nothing to run (its {noun}s: {', '.join(table[fw])}); "
                f"add one, e.g. {fw}:{table[fw][0]}"
            )
    return {fw: tuple(name for name in table[fw] if name in wanted[fw]) for fw in frameworks}


def parse_executions(text: str, frameworks: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """'default', 'all', or a comma list of 'name' (every framework that has it) and 'framework:name'."""
    return _parse_per_framework("--execution", text, frameworks, EXECUTIONS, "execution", "eager,xla or torch:compile")


def parse_impls(text: str, frameworks: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """'default', 'all', or a comma list of variants (every framework that has it) and 'framework:variant'."""
    return _parse_per_framework("--impl", text, frameworks, IMPLS, "variant", "idiomatic,tuned or jax:tuned")


def parse_input_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '256x192' -> (height 256, width 192)."""
    parts = str(text).lower().replace("*", "x").split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise SettingsError(f"--input-size must be SIZE or HEIGHTxWIDTH such as 256 or 256x192, got {text!r}")
    sizes = [parse_positive_int("--input-size", p) for p in parts]
    return (sizes[0], sizes[-1])


def _parse_on_off(flag: str, text: str) -> bool:
    """'on' or 'off' (also true/false, 1/0) -> bool."""
    value = str(text).strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise SettingsError(f"{flag} must be on or off, got {text!r}")


def ray_installed() -> bool:
    """Whether Ray can be imported (asked without importing it; the one place to ask, and to patch in tests)."""
    return importlib.util.find_spec("ray") is not None


def parse_executor(executor: str | None, ray_address: str | None) -> tuple[str, str]:
    """--executor and --ray-address -> (executor, address); Ray asked for but not installed is bad input."""
    chosen = (executor or "local").strip()
    if chosen not in EXECUTORS:
        raise SettingsError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    address = (ray_address or "").strip()
    if ray_address is not None and chosen != "ray":
        raise SettingsError(f"--ray-address {ray_address!r} names a Ray cluster, but the run is local; add --executor ray")
    if ray_address is not None and not address:
        raise SettingsError("--ray-address must be HOST:PORT of a Ray cluster's head, auto or local, got ''")
    if chosen == "ray" and not ray_installed():
        raise SettingsError(RAY_MISSING)
    return chosen, address


def install_hint(framework: str) -> str:
    """The pip command for `framework` on this machine: its CUDA extra when NVML sees a GPU, else its CPU one."""
    return install_command(framework, gpu=nvml.gpu_present())


def resolve_device(requested: str) -> str:
    """'auto' -> 'gpu' when NVML sees a GPU, else 'cpu'; 'gpu' without one is a user error."""
    if requested not in DEVICES:
        raise SettingsError(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    present = nvml.gpu_present()
    if requested == "gpu" and not present:
        raise SettingsError("--device gpu: no GPU is visible (NVML found none); use --device cpu or --device auto")
    return "gpu" if present else "cpu"


def offered_devices(device: str) -> int:
    """Data-parallel devices this machine can offer: its GPUs that NVML sees, or on a CPU one per usable core
    (each replica of a CPU run is a process or device with its own share of the cores)."""
    if device == "gpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = len(nvml.gpus())
        return min(count, len([v for v in visible.split(",") if v.strip()])) if visible else count
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_devices(counts: tuple[int, ...], device: str, phases: tuple[str, ...], batch_sizes: tuple[int, ...],
                  config: HourglassConfig, *, given_batch: bool) -> bool:  # fmt: skip
    """SettingsError for device counts this run cannot measure; returns whether batch sizes are per device
    (RunSettings.batch_per_device: no --batch-size given and a count above 1)."""
    several = [n for n in counts if n > 1]
    if not several:
        return False
    listed = ",".join(map(str, counts))
    if DATA_PARALLEL_PHASE not in phases:
        raise SettingsError(f"--devices {listed} measures data-parallel training (the forward_backward phase), but "
                            f"--phase is {','.join(phases)}; add --phase forward_backward or --phase all")  # fmt: skip
    offered = offered_devices(device)
    if max(several) > offered:
        what = "GPUs" if device == "gpu" else "CPU devices (one per usable core)"
        raise SettingsError(f"--devices {listed}: this machine offers {offered} {what}, not {max(several)}; "
                            f"use at most --devices {offered}")  # fmt: skip
    if given_batch:
        for n in several:
            bad = [b for b in batch_sizes if b % n]
            if bad:
                raise SettingsError(f"--batch-size {bad[0]} is the global batch and does not split over {n} devices; "
                                    f"use a multiple of {n} (per-device batch = global / devices)")  # fmt: skip
    smallest = smallest_train_batch(config)
    per_device = min(b // n for n in several for b in batch_sizes) if given_batch else min(batch_sizes)
    if per_device < smallest:
        raise SettingsError(f"a per-device batch of {per_device} leaves train-mode batch norm one value per channel "
                            f"at the innermost level of this network; give each device at least {smallest} images "
                            "(--batch-size is the global batch)")  # fmt: skip
    return not given_batch


# ---------------------------------------------------------------- the whole run


def build_settings(
    *,
    framework: str = "all",
    preset: str | None = None,
    stacks: str | None = None,
    depth: str | None = None,
    channels: str | None = None,
    keypoints: str | None = None,
    input_size: str | None = None,
    batch_size: str | None = None,
    phase: str | None = None,
    execution: str | None = None,
    impl: str | None = None,
    precision: str | None = None,
    device: str = "auto",
    warmup: str | None = None,
    iters: str | None = None,
    min_time: str | None = None,
    timeout: str | None = None,
    rounds: str | None = None,
    timing_only: bool | None = None,
    fp32_math: str | None = None,
    autotune: str | None = None,
    out: str = "results",
    protocol: str = "default",
    devices: str | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
) -> RunSettings:
    """RunSettings from the `run` command's option strings (None = not given); raises SettingsError."""
    frameworks = parse_frameworks(framework)
    executor_name, address = parse_executor(executor, ray_address)
    explicit = [i.strip().lower() for i in framework.split(",")] != ["all"]
    if explicit:
        missing = [fw for fw in frameworks if not is_installed(fw)]
        if missing:
            fw = missing[0]
            raise SettingsError(f"framework {fw!r} is not installed; install it with: {install_hint(fw)}")

    if protocol not in PROTOCOLS:
        raise SettingsError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "seed":
        given = {
            "--preset": preset, "--batch-size": batch_size, "--warmup": warmup, "--iters": iters,
            "--min-time": min_time, "--stacks": stacks, "--depth": depth, "--channels": channels,
            "--keypoints": keypoints, "--input-size": input_size,
        }  # fmt: skip
        clash = [flag for flag, value in given.items() if value is not None]
        if clash:
            raise SettingsError(
                f"--protocol seed fixes the preset, batch size and loop counts; drop {', '.join(clash)}"
            )

    resolved_device = resolve_device(device)
    defaults = _DEFAULTS[resolved_device]

    preset_name = preset if preset is not None else "seed"
    try:
        config = get_preset(preset_name)
    except ConfigError as err:
        raise SettingsError(f"--preset: {err}") from None
    changes: dict[str, object] = {}
    overrides = {"stacks": stacks, "depth": depth, "channels": channels, "keypoints": keypoints}
    for flag, config_field in CONFIG_FLAGS.items():
        value = overrides[flag]
        if value is not None:
            changes[config_field] = parse_positive_int(f"--{flag}", value)
    if input_size is not None:
        changes["input_hw"] = parse_input_size(input_size)
    try:
        config = config.replace(**changes)
    except ConfigError as err:
        raise SettingsError(f"{err} (check --preset, --depth, --channels and --input-size)") from None

    if protocol == "seed":
        batch_sizes = _SEED_PROTOCOL["batch_sizes"]
        warmup_n, iters_n, min_time_s = _SEED_PROTOCOL["warmup"], _SEED_PROTOCOL["iters"], _SEED_PROTOCOL["min_time_s"]
    else:
        batch_sizes = parse_int_list("--batch-size", batch_size) if batch_size is not None else defaults.batch_sizes
        warmup_n = parse_positive_int("--warmup", warmup, minimum=0) if warmup is not None else defaults.warmup
        if iters is None and min_time is None:
            iters_n, min_time_s = defaults.iters, defaults.min_time_s
        else:
            iters_n = parse_positive_int("--iters", iters) if iters is not None else MAX_ITERS
            min_time_s = parse_positive_float("--min-time", min_time) if min_time is not None else None

    if execution is not None:
        executions = parse_executions(execution, frameworks)
    else:
        executions = {fw: defaults.executions[fw] for fw in frameworks}
    variant_executions: dict[str, tuple[str, ...]] = {}
    if impl is not None:
        impls = parse_impls(impl, frameworks)
    else:
        impls = {fw: tuple(v for v in defaults.impls.get(fw, (DEFAULT_IMPL,)) if v in IMPLS[fw]) for fw in frameworks}
        variant_executions = {key: tuple(ex) for key, ex in defaults.variant_executions.items()
                              if key.split(":")[0] in frameworks}  # fmt: skip
        # A variant none of whose executions was selected (--execution torch:compile) is not measured.
        impls = {fw: tuple(v for v in variants
                           if any(ex in variant_executions.get(f"{fw}:{v}", executions[fw]) for ex in executions[fw]))
                 for fw, variants in impls.items()}  # fmt: skip

    phases = parse_choices("--phase", phase, PHASES) if phase is not None else PHASES
    for fw, variants in impls.items():  # a variant with no code of its own in these phases has nothing to measure
        idle = [v for v in variants if not set(IMPL_PHASES.get((fw, v), phases)) & set(phases)]
        if idle and impl is not None:
            only = ", ".join(IMPL_PHASES[(fw, idle[0])])
            raise SettingsError(f"--impl {impl!r}: {fw}'s {idle[0]} variant differs from its {DEFAULT_IMPL} one in the "
                                f"{only} phase only, so it has nothing to measure in {', '.join(phases)}; add "
                                f"--phase {only} or choose {fw}:{DEFAULT_IMPL}")  # fmt: skip
        impls[fw] = tuple(v for v in variants if v not in idle)
    device_counts = parse_int_list("--devices", devices) if devices is not None else (1,)
    batch_per_device = check_devices(device_counts, resolved_device, phases, batch_sizes, config,  # type: ignore[arg-type]
                                     given_batch=batch_size is not None or protocol == "seed")  # fmt: skip

    return RunSettings(
        frameworks=frameworks,
        framework_selection=framework if explicit else "all",
        preset=preset_name,
        config=config,
        batch_sizes=batch_sizes,  # type: ignore[arg-type]
        phases=phases,
        devices=tuple(sorted(device_counts)),
        batch_per_device=batch_per_device,
        executions=executions,
        impls=impls,
        variant_executions=variant_executions,
        precisions=parse_choices("--precision", precision, PRECISIONS) if precision is not None else ("fp32",),
        device=resolved_device,
        device_requested=device,
        warmup=warmup_n,  # type: ignore[arg-type]
        iters=iters_n,  # type: ignore[arg-type]
        min_time_s=min_time_s,  # type: ignore[arg-type]
        timeout_s=parse_positive_float("--timeout", timeout) if timeout is not None else 900.0,
        rounds=parse_positive_int("--rounds", rounds) if rounds is not None else defaults.rounds,
        fp32_math=parse_choices("--fp32-math", fp32_math, FP32_MATH)[0] if fp32_math is not None else "ieee",
        autotune=_parse_on_off("--autotune", autotune) if autotune is not None else True,
        checks=not timing_only,
        out_dir=out,
        protocol=protocol,
        executor=executor_name,
        ray_address=address,
    )
