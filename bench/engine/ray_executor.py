"""`bench run --executor ray`: every worker a Ray task that takes a whole measurement slot of one node.

Isolation. A node offers `hgbench_slot` resources (`ray start --resources '{"hgbench_slot": 1}'`) and every
task takes one slot whole, so with one slot per node no two workers ever share a node's CPUs or GPUs while
timing. A task asks Ray for no CPUs (num_cpus=0): the slot already limits what a node admits, and Ray's
CPU accounting would only add a second limit that can disagree with it (a 2-core node would admit no task
asking for all its cores while another job holds one). Ray sets OMP_NUM_THREADS in its workers (to 1 for a
task without CPUs), which a framework would inherit: the task gives the worker the driver's value instead,
or none, as a local worker has. On a GPU run a task asks for as many GPUs as its worker uses (1, or N under
--devices N) and Ray points CUDA_VISIBLE_DEVICES at them. Inside the task the worker is a fresh process
exactly as locally (bench.engine.launch.run_worker: its own process group, killed at --timeout, dead with
the task's process). The driver's HGBENCH_* switches (test switches included) travel with every task.

Files. Worker specs name files in the driver's temp folder (heatmaps, gradients); on the node those paths
are moved into a node-local folder, and the task returns the files' bytes with the worker's log and
outcome; the driver writes them where the spec said, and the log to RUN/logs/<name>.log. A run's compile
cache (--rounds) stays in the node's folder, and a cell's later rounds run on the node of its first round
(hard node affinity): they find its compilations, and a cell's rounds are one machine's.

Dispatch. The driver keeps at most as many tasks in flight on a node as it has slots, submitted in the
run's interleaved order: a task starts when it is submitted, every node runs its cells in the run's order,
and the driver's guard (--timeout + GUARD_MARGIN_S from submission) measures a node that stopped
answering, not a queue (unless another driver shares the slots). Faults are rows: a task whose process or
node died (WorkerCrashedError, NodeDiedError, ObjectLostError ...), a cancelled task, a node past the
guard become failed or timeout outcomes naming the node and the Ray error. Tasks are never retried
(max_retries=0): a measurement silently re-run elsewhere would hide the fault. Ctrl-C or SIGTERM cancels
every task in flight (force) and keeps finished rows.

The cluster. --ray-address HOST:PORT connects to a running cluster, which the run never stops. Without it,
Ray's own rule: RAY_ADDRESS, else the cluster `ray start` left on this machine, else a fresh cluster on the
loopback interface only (one slot, this machine's usable cores), shut down when the run ends, errors and
Ctrl-C included; `--ray-address local` always starts a fresh one. A process already connected to Ray (a
notebook, the tests) is used as it is and left connected. Ray is imported only in here, when a run asks for
it, so `import bench` never needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bench.core import envinfo
from bench.core import settings as settings_mod
from bench.core.settings import SettingsError
from bench.engine import procs
from bench.engine.executor import AbstractExecutor, Job
from bench.engine.launch import WorkerOutcome, run_worker
from bench.engine.protocol import WorkerSpec, empty_result, spec_devices

SLOT = "hgbench_slot"  # the custom resource of a measurement slot; a task takes one whole
GUARD_MARGIN_S = 120.0  # beyond --timeout: the node's own run_worker ends a late worker at --timeout
POLL_S = 0.5  # how often the driver looks at tasks in flight (and their guard)
NODES_REFRESH_S = 5.0  # how often the driver asks which nodes are alive while nothing finishes
NODE_TASK_TIMEOUT_S = 120.0  # a node's environment record or clean-up
NODE_DIR_PREFIX = "hgbench-ray-"  # the node-local folder of one driver's tasks, under the node's temp folder
FORWARDED_PREFIX = "HGBENCH_"  # the driver's switches every task's worker gets
THREAD_VARS = ("OMP_NUM_THREADS",)  # set by Ray in its workers; the driver's value (or none) wins
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # a local cluster's share of /dev/shm: logs and heatmaps, not tensors
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # see loopback_only
# Ray's own log lines stay off the run's console (its token-auth notice on every start among them); what goes
# wrong with a task is said by the task's row.
QUIET: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
SLOT_HINT = "ray start --head --resources '{\"hgbench_slot\": 1}' on one node, ray start --address=HEAD:6379 --resources '{\"hgbench_slot\": 1}' on the others"


# ---------------------------------------------------------------- on the node (inside a Ray task)


def _node_folder(key: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{NODE_DIR_PREFIX}{key}"


def _move_paths(obj: Any, old: str, new: str) -> tuple[Any, dict[str, str]]:
    """`obj` (a spec or result dataclass) with every text field under folder `old` moved under `new`, and the
    moves made (old path -> new path)."""
    moves: dict[str, str] = {}
    changes: dict[str, str] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
            changes[f.name] = moves[value] = new + value[len(old.rstrip("/")) :]
    return (dataclasses.replace(obj, **changes) if changes else obj), moves


@contextlib.contextmanager
def _niceness(wanted: int) -> Iterator[int]:
    """Within: this process at niceness `wanted` where it may lower its own (root, CAP_SYS_NICE, RLIMIT_NICE),
    so that a worker it starts inherits it; yields the niceness in force. Ray starts its workers at 15
    (RAY_worker_niceness), which a local worker never has."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    with contextlib.suppress(OSError):  # not allowed here: the worker runs at Ray's niceness, and the driver says so
        os.setpriority(os.PRIO_PROCESS, 0, wanted)
    try:
        yield os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        with contextlib.suppress(OSError):  # raising it back is always allowed
            os.setpriority(os.PRIO_PROCESS, 0, before)


def _node_call(spec: WorkerSpec, name: str, timeout_s: float, env: Mapping[str, str | None], driver_workdir: str,
               key: str, niceness: int) -> dict[str, Any]:  # fmt: skip
    """The Ray task: one worker on this node, in its folder, at the driver's niceness; returns the outcome, the
    log, the files and the niceness the worker ran at."""
    import ray

    folder = _node_folder(key)
    folder.mkdir(parents=True, exist_ok=True)
    spec_here, moves = _move_paths(spec, driver_workdir, str(folder))
    log_path = folder / f"{name}.log"
    with _niceness(niceness) as ran_at:
        outcome = run_worker(spec_here, workdir=folder, name=name, log_path=log_path, timeout_s=timeout_s,
                             env_changes=env)  # fmt: skip
    outcome.result, _ = _move_paths(outcome.result, str(folder), driver_workdir)
    files: dict[str, bytes] = {}
    for driver_path, node_path in moves.items():
        path = Path(node_path)
        if path.is_file():  # an output the worker wrote (a compile cache is a folder and stays)
            files[driver_path] = path.read_bytes()
            path.unlink()
    log = log_path.read_bytes() if log_path.is_file() else b""
    for path in (log_path, folder / f"{name}.spec.json", folder / f"{name}.result.json"):
        path.unlink(missing_ok=True)
    outcome.host, outcome.node_id = socket.gethostname(), ray.get_runtime_context().get_node_id()
    return {"outcome": outcome, "log": log, "files": files, "niceness": ran_at}


def _node_environment(args: list[str]) -> dict[str, Any]:
    """The Ray task: this node's `bench env` record."""
    return envinfo.collect(args)


def _node_cleanup(key: str) -> None:
    """The Ray task: remove this driver's folder on this node (compile caches included)."""
    shutil.rmtree(_node_folder(key), ignore_errors=True)


@functools.cache
def _remote(function: Any) -> Any:
    """`function` as a Ray remote function, made once per process (each one is exported to the cluster)."""
    import ray

    return ray.remote(function)


# ---------------------------------------------------------------- on the driver


def _task_env() -> dict[str, str | None]:
    """The environment changes every task's worker gets: the driver's HGBENCH_* switches and thread counts."""
    env: dict[str, str | None] = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIX)}
    env.pop(procs.PARENT_PID_ENV, None)  # the task's own process is the worker's parent there
    for var in THREAD_VARS:
        env[var] = os.environ.get(var)  # None: unset on the node too
    return env


def _first_lines(text: str, lines: int = 6) -> str:
    kept = [line for line in str(text).strip().splitlines() if line.strip()]
    return "\n".join(kept[:lines])


def _running_cluster() -> str | None:
    """The cluster Ray's own rule finds without an address (RAY_ADDRESS, then the one `ray start` left on this
    machine), or None: then a local one is started."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None) or None
    except (ImportError, AttributeError):  # another Ray version: the environment variable alone
        return None


def _is_loopback(address: str) -> bool:
    host = address.strip().rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within: a cluster Ray starts listens on 127.0.0.1 only, and a driver reaches one that does.

    On Linux Ray advertises the machine's network address even when told 127.0.0.1, and its servers then
    listen on every interface; only with its switch for machines without clusters
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) does it keep to the loopback address. That switch is read from the
    environment by the processes ray.init starts and, once, when this process imported Ray, so both are set
    here (a private constant of Ray's, checked to exist) and put back afterwards."""
    import ray._private.ray_constants as constants

    previous_env, previous = os.environ.get(LOOPBACK_SWITCH), getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[LOOPBACK_SWITCH] = "0"
    if previous is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = previous_env
        if previous is not None:
            constants.ENABLE_RAY_CLUSTER = previous


def start_local_cluster(num_cpus: int | None = None) -> str:
    """A fresh Ray cluster of this machine alone, on the loopback interface, with one measurement slot; its
    address. This process is its driver: ray.shutdown() stops it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a benchmark harness reports no usage
    with loopback_only():
        ray.init(address="local", num_cpus=num_cpus or len(os.sched_getaffinity(0)), resources={SLOT: 1},
                 include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 **QUIET)  # fmt: skip
    return str(ray.get_runtime_context().gcs_address)


def _same_address(a: str, b: str) -> bool:
    """Whether two HOST:PORT addresses name one cluster (localhost and 127.0.0.1 alike)."""

    def norm(text: str) -> str:
        host, _, port = text.strip().rpartition(":")
        return f"{'127.0.0.1' if host in ('localhost', '') else host}:{port}"

    return norm(a) == norm(b)


@dataclass
class _Flight:
    """A job submitted and not yet collected."""

    index: int
    job: Job
    node_id: str
    host: str
    submitted: float  # time.monotonic()


class RayExecutor(AbstractExecutor):
    """Workers as Ray tasks, one per measurement slot, several at once when the cluster has several slots."""

    name: ClassVar[str] = "ray"
    concurrent: ClassVar[bool] = True

    def __init__(self, address: str, *, started_cluster: bool, owns_connection: bool) -> None:
        self.address = address  # the cluster's GCS address, HOST:PORT
        self.started_cluster = started_cluster  # a local cluster this run started (and stops)
        self._owns_connection = owns_connection  # False: the process was connected before the run; stays so
        self._key = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this driver's folder on every node
        self._nodes: dict[str, dict[str, Any]] = {}
        self._nodes_at = float("-inf")  # when _nodes was last asked for
        self._niced: set[str] = set()  # nodes already said to run their workers niced
        self._notes: list[str] = []  # warnings for the run, taken by take_notes()
        self._closed = False

    # -- connecting

    @classmethod
    def connect(cls, address: str = "") -> RayExecutor:
        """Connect to the cluster `address` names (see the module's docstring) and check it has slots."""
        if not settings_mod.ray_installed():
            raise SettingsError(settings_mod.RAY_MISSING)
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a benchmark harness reports no usage
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            if address and address not in ("auto", "local") and not _same_address(address, current):
                raise SettingsError(f"--ray-address {address}: this process is already connected to the Ray cluster at "
                                    f"{current}; give that address or none")  # fmt: skip
            executor = cls(current, started_cluster=False, owns_connection=False)
        else:
            target = address or _running_cluster()
            if target and target != "local":
                try:
                    with loopback_only() if _is_loopback(target) else contextlib.nullcontext():
                        ray.init(address=target, **QUIET)
                except Exception as err:  # a user's address: whatever Ray says is the reason, on one line
                    where = "--ray-address" if address else "the running Ray cluster found (RAY_ADDRESS or `ray start`) at"
                    raise SettingsError(f"{where} {target}: cannot connect ({type(err).__name__}: "
                                        f"{_first_lines(str(err), 1)}); start the cluster with: {SLOT_HINT}, or give "
                                        "--ray-address local for a fresh cluster on this machine") from None  # fmt: skip
                executor = cls(ray.get_runtime_context().gcs_address, started_cluster=False, owns_connection=True)
            else:
                executor = cls(start_local_cluster(), started_cluster=True, owns_connection=True)
        try:
            executor._check_slots()
        except BaseException:
            executor.close()
            raise
        return executor

    def _check_slots(self) -> None:
        if not self._slot_nodes(refresh=True):
            raise SettingsError(f"the Ray cluster at {self.address} has no alive node with an {SLOT!r} resource, so no "
                                f"cell could run isolated; give each node a slot: {SLOT_HINT}")  # fmt: skip

    def _slot_nodes(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """Alive nodes that offer a slot: node id -> Ray's record of it (Resources, NodeManagerHostname, ...)."""
        if refresh or time.monotonic() - self._nodes_at > NODES_REFRESH_S:
            import ray

            self._nodes = {str(n["NodeID"]): n for n in ray.nodes()
                           if n.get("Alive") and float((n.get("Resources") or {}).get(SLOT, 0)) >= 1}  # fmt: skip
            self._nodes_at = time.monotonic()
        return self._nodes

    def node_alive(self, node_id: str) -> bool:
        """Whether `node_id` is alive and offers a slot."""
        return node_id in self._slot_nodes(refresh=True)

    def take_notes(self) -> list[str]:
        """Warnings about how workers ran (a niced node) since the last call."""
        notes, self._notes = self._notes, []
        return notes

    # -- what run.json records

    def describe(self, args: list[str]) -> dict[str, Any]:
        """executor, ray_address, how the cluster came to be, and every slot node's environment record."""
        return {
            "executor": self.name,
            "ray_address": self.address,
            "ray_cluster": "started for this run on the loopback interface" if self.started_cluster else "connected",
            "ray_slot_resource": SLOT,
            "nodes": self._per_node(_node_environment, args),
        }

    def _per_node(self, function: Any, *args: Any, slot: bool = True) -> dict[str, Any]:
        """`function(*args)` as one task on each slot node (taking its slot: nothing of ours runs there meanwhile);
        node id -> its value, or {"error": ...} when the node did not answer in time."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = {}
        for node_id in self._slot_nodes(refresh=True):
            options = {"num_cpus": 0, "max_retries": 0, "resources": {SLOT: 1} if slot else {},
                       "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}  # fmt: skip
            refs[node_id] = _remote(function).options(**options).remote(*args)
        found: dict[str, Any] = {}
        deadline = time.monotonic() + NODE_TASK_TIMEOUT_S
        for node_id, ref in refs.items():
            try:
                found[node_id] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as err:  # a node that died or hung: said in the record, the run goes on
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
                found[node_id] = {"error": f"{type(err).__name__}: {_first_lines(str(err), 1)}"}
        return found

    # -- running workers

    def call(self, job: Job, *, workdir: Path, logs_dir: Path, timeout_s: float, run_dir: Path | None) -> WorkerOutcome:
        """One job as one task, waited for."""
        with contextlib.closing(self.run_many([job], workdir=workdir, logs_dir=logs_dir, timeout_s=timeout_s,
                                              run_dir=run_dir)) as outcomes:  # fmt: skip
            return next(outcomes)[1]

    def run_many(self, jobs: Sequence[Job], *, workdir: Path, logs_dir: Path, timeout_s: float,
                 run_dir: Path | None) -> Iterator[tuple[int, WorkerOutcome]]:  # fmt: skip
        """Submit the jobs in order as slots free up; yield (index, outcome) as each finishes. Closing the
        generator early (Ctrl-C, SIGTERM in the caller) cancels every task in flight."""
        import ray

        waiting = list(range(len(jobs)))
        running: dict[Any, _Flight] = {}
        env, niceness = _task_env(), os.getpriority(os.PRIO_PROCESS, 0)
        try:
            while waiting or running:
                nodes = self._slot_nodes(refresh=not running)
                busy = Counter(flight.node_id for flight in running.values())
                for index in list(waiting):
                    job = jobs[index]
                    node_id = self._place(job, nodes, busy)
                    if node_id is None:
                        continue  # its node is busy: it waits, later jobs for other nodes go ahead
                    waiting.remove(index)
                    if not node_id:  # no node could ever take it
                        yield index, self._no_node(job, nodes, logs_dir)
                        continue
                    options = self._options(job.spec, node_id)
                    ref = _remote(_node_call).options(**options).remote(job.spec, job.name, timeout_s, env,
                                                                        str(workdir), self._key, niceness)  # fmt: skip
                    host = str(nodes[node_id].get("NodeManagerHostname") or "")
                    running[ref] = _Flight(index, job, node_id, host, time.monotonic())
                    busy[node_id] += 1
                if not running:
                    continue
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    flight = running.pop(ref)
                    yield flight.index, self._collect(ref, flight, logs_dir)
                now = time.monotonic()
                for ref, flight in list(running.items()):
                    if now - flight.submitted > timeout_s + GUARD_MARGIN_S:
                        running.pop(ref)
                        with contextlib.suppress(Exception):
                            ray.cancel(ref, force=True)
                        yield flight.index, self._past_guard(flight, timeout_s, logs_dir)
        finally:
            for ref in running:  # stopped early: nothing of this run may go on measuring
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    @staticmethod
    def _gpus(spec: WorkerSpec) -> int:
        """GPUs the task asks Ray for: as many as the worker uses on a GPU run, none on a CPU run."""
        return spec_devices(spec) if spec.device == "gpu" else 0

    def _place(self, job: Job, nodes: Mapping[str, Mapping[str, Any]], busy: Counter[str]) -> str | None:
        """The node to submit `job` to now; None to wait for a busy one; "" when no alive node can take it."""
        gpus = self._gpus(job.spec)

        def fits(node_id: str) -> bool:
            return float((nodes[node_id].get("Resources") or {}).get("GPU", 0)) >= gpus

        def free(node_id: str) -> int:
            return int(float(nodes[node_id]["Resources"][SLOT])) - busy[node_id]

        if job.node_id in nodes and fits(job.node_id):  # a later round: where the first one ran
            return job.node_id if free(job.node_id) > 0 else None
        eligible = [n for n in nodes if fits(n)]
        if not eligible:
            return ""
        ready = [n for n in eligible if free(n) > 0]
        return max(ready, key=free) if ready else None

    def _options(self, spec: WorkerSpec, node_id: str) -> dict[str, Any]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"resources": {SLOT: 1}, "num_cpus": 0, "num_gpus": self._gpus(spec), "max_retries": 0,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}  # fmt: skip

    def _collect(self, ref: Any, flight: _Flight, logs_dir: Path) -> WorkerOutcome:
        """The finished task's outcome, its log and files written here; a task that died is a failed outcome."""
        import ray

        try:
            reply = ray.get(ref)
        except ray.exceptions.RayError as err:  # the task's process or node died, or it was cancelled
            cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None else err
            error = (f"the Ray task of {flight.job.name} on node {flight.node_id} ({flight.host}) ended without a "
                     f"result: {type(cause).__name__}: {_first_lines(str(cause))}")  # fmt: skip
            return self._lost(flight, "failed", error, logs_dir)
        logs_dir.mkdir(parents=True, exist_ok=True)
        (logs_dir / f"{flight.job.name}.log").write_bytes(reply["log"])
        for path, data in reply["files"].items():
            Path(path).write_bytes(data)
        outcome: WorkerOutcome = reply["outcome"]
        wanted = os.getpriority(os.PRIO_PROCESS, 0)
        if reply["niceness"] != wanted and flight.node_id not in self._niced:
            self._niced.add(flight.node_id)
            self._notes.append(f"node {flight.node_id} ({flight.host}) ran its workers at niceness {reply['niceness']}, "
                               f"not {wanted} as a local worker runs: Ray starts its workers at 15, and the task may "
                               "not lower it there; start that node's Ray with RAY_worker_niceness=0 in its "
                               "environment")  # fmt: skip
        return outcome

    def _past_guard(self, flight: _Flight, timeout_s: float, logs_dir: Path) -> WorkerOutcome:
        error = (f"no answer from node {flight.node_id} ({flight.host}) within --timeout {timeout_s:g} s + "
                 f"{GUARD_MARGIN_S:g} s (the node ends a late worker at --timeout itself, so the node stopped "
                 "answering); the Ray task was cancelled")  # fmt: skip
        return self._lost(flight, "timeout", error, logs_dir)

    def _no_node(self, job: Job, nodes: Mapping[str, Any], logs_dir: Path) -> WorkerOutcome:
        gpus = self._gpus(job.spec)
        error = (f"no alive node of the Ray cluster at {self.address} has an {SLOT!r} resource"
                 + (f" and {gpus} GPU(s)" if gpus else "") + f" ({len(nodes)} node(s) with a slot); {SLOT_HINT}")
        return self._lost(_Flight(-1, job, "", "", time.monotonic()), "failed", error, logs_dir)

    @staticmethod
    def _lost(flight: _Flight, status: str, error: str, logs_dir: Path) -> WorkerOutcome:
        """An outcome for a task that returned nothing; its log says why."""
        logs_dir.mkdir(parents=True, exist_ok=True)
        (logs_dir / f"{flight.job.name}.log").write_text(error + "\n")
        result = empty_result(flight.job.spec, status, error)
        return WorkerOutcome(status, error, result, time.monotonic() - flight.submitted, "", flight.host, flight.node_id)

    # -- the end

    def close(self) -> None:
        """Remove this driver's node folders; disconnect, and stop the cluster when this run started it."""
        if self._closed:
            return
        self._closed = True
        import ray

        if not ray.is_initialized():
            return
        try:
            with contextlib.suppress(Exception):  # a node that is gone keeps its folder; nothing else to do
                self._per_node(_node_cleanup, self._key, slot=False)
        finally:
            if self._owns_connection:
                ray.shutdown()
