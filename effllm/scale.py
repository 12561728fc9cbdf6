"""Scale out: parameter sweeps over a notebook, run on Ray or SLURM (through submitit).

A sweep file (YAML) names one notebook, a parameter grid and the resources each run needs:

    name: wanda_calibration_sets        # optional; default: the file's stem
    notebook: 04_domain_submodels       # stem, NN prefix or title, as for run_all.py --only
    profile: paper                      # optional; default: run_all.py --profile
    parameters: {nsamples: 128}         # optional: the same for every run
    grid:                               # every combination is one run
      calibration_set: [c4, wmt14]
      sparsity: [0.5, 0.6]
    resources: {cpus: 8, gpus: 1, memory_gb: 64, time_limit_min: 120}

``grid`` may also be a list of such mappings: the runs are the union of their products (for example
unstructured sparsities in one, N:M patterns without a sparsity in another).

No scheduler is written here: :class:`RayExecutor` submits every run as a Ray task with its CPUs, GPUs
and memory, and :class:`SubmititExecutor` as a SLURM job through ``submitit.AutoExecutor`` (or
submitit's local cluster, for tests). Both call a picklable ``work(job)`` where the run executes and a
``finish(job, outcome)`` on the submitting machine when it ends, and hand back a
``concurrent.futures.Future`` of its result: the `Executor` protocol of run_all.py. Ray and submitit are
imported only when such an executor is made (``pip install -e ".[scale]"``).
"""

from __future__ import annotations

import itertools
import math
import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SWEEP_KEYS = ("name", "notebook", "profile", "parameters", "grid", "resources")
RESOURCE_KEYS = ("cpus", "gpus", "memory_gb", "time_limit_min")
# Set by run_all.py for every run; a sweep may not vary them.
RESERVED_PARAMETERS = ("profile", "figures_dir")
EXECUTORS = ("local", "ray", "slurm")


class SweepError(ValueError):
    """A sweep file that cannot be used; the message names the file, the entry and what is allowed."""


@dataclass(frozen=True)
class Resources:
    """What one run of a sweep needs. ``gpus`` may be fractional on Ray (runs sharing a GPU)."""

    cpus: int = 1
    gpus: float = 0
    memory_gb: float | None = None
    time_limit_min: float | None = None

    @property
    def time_limit_s(self) -> float | None:
        return None if self.time_limit_min is None else self.time_limit_min * 60


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: see the module docstring for the format."""

    name: str
    notebook: str
    grid: list[dict[str, list[Any]]]
    parameters: dict[str, Any] = field(default_factory=dict)
    resources: Resources = Resources()
    profile: str | None = None

    def points(self) -> list[dict[str, Any]]:
        """Every grid point (one run each), in file order: the union of each mapping's product."""
        points = []
        for block in self.grid:
            keys = list(block)
            points.extend(dict(zip(keys, values, strict=True)) for values in itertools.product(*block.values()))
        return points

    def run_ids(self) -> list[str]:
        """One folder name per point: its index, then the point's values (``003-sparsity=0.5_pattern=2-4``)."""
        points = self.points()
        width = max(3, len(str(len(points) - 1)))
        return [f"{i:0{width}d}-{point_slug(point)}" for i, point in enumerate(points)]


def point_slug(point: dict[str, Any], max_chars: int = 96) -> str:
    """A file-name-safe rendering of a grid point: ``key=value`` pairs joined by ``_``."""
    def text(value: Any) -> str:
        if isinstance(value, list | tuple):
            return "+".join(text(v) for v in value)
        return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "x"

    slug = "_".join(f"{key}={text(value)}" for key, value in point.items())
    return slug[:max_chars] or "run"


def _fail(path: Path | str, message: str) -> SweepError:
    return SweepError(f"sweep file {path}: {message}")


def _resources(path: Path | str, raw: Any) -> Resources:
    if raw is None:
        return Resources()
    if not isinstance(raw, dict):
        raise _fail(path, f"'resources' must be a mapping with keys {', '.join(RESOURCE_KEYS)}; got {raw!r}")
    unknown = sorted(set(raw) - set(RESOURCE_KEYS))
    if unknown:
        raise _fail(path, f"unknown resource(s) {unknown}; allowed: {', '.join(RESOURCE_KEYS)} "
                          "(memory in GB, time limit in minutes)")

    def number(key: str, minimum: float, integer: bool = False) -> Any:
        value = raw.get(key)
        if value is None:
            return None
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= minimum
        if not ok or (integer and value != int(value)):
            kind = "a whole number" if integer else "a number"
            raise _fail(path, f"resources.{key} must be {kind} >= {minimum:g}; got {value!r}")
        return int(value) if integer else float(value)

    cpus = number("cpus", 1, integer=True)
    gpus = number("gpus", 0)
    memory = number("memory_gb", 0)
    limit = number("time_limit_min", 0)
    if memory == 0 or limit == 0:
        raise _fail(path, "resources.memory_gb and resources.time_limit_min must be > 0 (leave them out for none)")
    return Resources(cpus=cpus or 1, gpus=gpus or 0, memory_gb=memory, time_limit_min=limit)


def _check_name(path: Path | str, where: str, key: Any) -> None:
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise _fail(path, f"{where}: parameter names must be Python names; got {key!r}")
    if key in RESERVED_PARAMETERS:
        raise _fail(path, f"{where}: {key!r} is set by run_all.py and cannot be swept "
                          "(give the profile as the sweep's 'profile' or --profile)")


def _grid(path: Path | str, raw: Any) -> list[dict[str, list[Any]]]:
    blocks = raw if isinstance(raw, list) else [raw]
    if not blocks or not all(isinstance(b, dict) and b for b in blocks):
        raise _fail(path, "'grid' must be a non-empty mapping of parameter -> list of values, or a list of such "
                          f"mappings (their runs are added up); got {raw!r}")
    for block in blocks:
        for key, values in block.items():
            _check_name(path, "grid", key)
            if not isinstance(values, list) or not values:
                raise _fail(path, f"grid.{key} must be a non-empty list of values; got {values!r} "
                                  "(a value that stays the same in every run goes under 'parameters')")
    return [dict(b) for b in blocks]


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; raises :class:`SweepError` saying what is wrong and what is allowed."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise _fail(path, f"cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise _fail(path, f"is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise _fail(path, f"must be a YAML mapping with keys {', '.join(SWEEP_KEYS)}; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown}; allowed: {', '.join(SWEEP_KEYS)}")
    for key in ("notebook", "grid"):
        if key not in raw:
            raise _fail(path, f"missing {key!r} (a sweep needs 'notebook' and 'grid')")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _fail(path, f"'name' must be a folder name of letters, digits, '_', '.', '-'; got {name!r}")
    notebook = raw["notebook"]
    if not isinstance(notebook, str | int) or isinstance(notebook, bool) or not str(notebook):
        raise _fail(path, f"'notebook' must be a notebook stem, NN prefix or title; got {notebook!r}")
    notebook = f"{notebook:02d}" if isinstance(notebook, int) else notebook
    profile = raw.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise _fail(path, f"'profile' must be a profile name; got {profile!r}")
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _fail(path, f"'parameters' must be a mapping of parameter -> value; got {parameters!r}")
    for key in parameters:
        _check_name(path, "parameters", key)
    grid = _grid(path, raw["grid"])
    both = sorted({k for block in grid for k in block} & set(parameters))
    if both:
        raise _fail(path, f"{both} appear both under 'parameters' and in 'grid'; keep each in one place")
    return Sweep(name=name, notebook=str(notebook), grid=grid, parameters=dict(parameters),
                 resources=_resources(path, raw.get("resources")), profile=profile)


# ---------------------------------------------------------------------------------------------------------
# Executors


def _pickle_by_value(function: Callable, pickler: Any) -> None:
    """Ship ``function``'s module by value: run_all.py is a script, not importable on a worker."""
    module = sys.modules.get(function.__module__)
    if module is not None and module.__name__ != "__main__" and not module.__name__.startswith("effllm"):
        pickler.register_pickle_by_value(module)


def _run_remotely(work: Callable[[Any], Any], job: Any) -> Any:
    return work(job)


class _Finisher:
    """Turns a remote outcome into the driver's result on a Future, never leaving the Future unset."""

    @staticmethod
    def settle(out: Future, finish: Callable[[Any, Any], Any], job: Any, outcome: Any) -> None:
        try:
            out.set_result(finish(job, outcome))
        except BaseException as error:  # finish itself failed (e.g. disk full): still a result, not a hang
            out.set_exception(error)


class RayExecutor:
    """Each run a Ray task with the sweep's ``num_cpus`` / ``num_gpus`` / ``memory``.

    ``address`` connects to a running cluster (``ray://host:10001`` or ``host:6379``; its nodes must see
    this repository at the same path and have effllm installed); without it a local Ray is started with
    room for ``local_runs`` runs at once and stopped again at :meth:`shutdown`.
    """

    def __init__(
        self,
        work: Callable[[Any], Any],
        finish: Callable[[Any, Any], Any],
        resources: Resources,
        address: str | None = None,
        local_runs: int = 1,
    ) -> None:
        import ray
        import ray.cloudpickle

        self._ray, self._work, self._finish = ray, work, finish
        _pickle_by_value(work, ray.cloudpickle)
        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # GPUs are detected, never declared: a local Ray must not pretend to have more than exist.
                ray.init(num_cpus=resources.cpus * local_runs, include_dashboard=False, log_to_driver=False)
            self._started = True
        try:
            self._check_feasible(resources)
        except BaseException:
            self.shutdown()
            raise
        options: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_retries": 0}
        if resources.memory_gb:
            options["memory"] = int(resources.memory_gb * 2**30)
        self._task = ray.remote(_run_remotely).options(**options)
        self._limit = resources.time_limit_s

    def _check_feasible(self, resources: Resources) -> None:
        """Ray would queue a task no node can hold forever; say so at once instead."""
        nodes = [n["Resources"] for n in self._ray.nodes() if n.get("Alive")]
        memory = (resources.memory_gb or 0) * 2**30
        if not any(n.get("CPU", 0) >= resources.cpus and n.get("GPU", 0) >= resources.gpus
                   and n.get("memory", math.inf) >= memory for n in nodes):
            have = [{k: n.get(k, 0) for k in ("CPU", "GPU")} | {"memory_gb": round(n.get("memory", 0) / 2**30, 1)}
                    for n in nodes]
            raise SweepError(
                f"no Ray node can hold one run (cpus={resources.cpus}, gpus={resources.gpus:g}, "
                f"memory_gb={resources.memory_gb}); the cluster's nodes have {have}. Lower the sweep's "
                "resources or connect to a larger cluster with --address."
            )

    def submit(self, job: Any) -> Future:
        ref = self._task.remote(self._work, job)
        out: Future = Future()
        timer = None
        if self._limit is not None:
            # The kernel stops itself at the limit (run_all's Job.time_limit); this is the backstop for a
            # task that never started its kernel or hangs elsewhere, counted from submission.
            timer = threading.Timer(self._limit * 2 + 60, lambda: self._ray.cancel(ref, force=True))
            timer.daemon = True
            timer.start()

        def done(future: Future) -> None:
            if timer is not None:
                timer.cancel()
            try:
                outcome = future.result()
            except BaseException as error:  # task error, worker died, cancelled
                outcome = error
            _Finisher.settle(out, self._finish, job, outcome)

        ref.future().add_done_callback(done)
        return out

    def shutdown(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


class SubmititExecutor:
    """Each run a SLURM job through ``submitit.AutoExecutor``; ``cluster="local"`` runs them as local
    processes (submitit's own test cluster), ``local_runs`` at a time."""

    def __init__(
        self,
        work: Callable[[Any], Any],
        finish: Callable[[Any, Any], Any],
        resources: Resources,
        folder: str | Path,
        cluster: str | None = None,
        partition: str | None = None,
        local_runs: int = 1,
        job_name: str = "effllm-sweep",
    ) -> None:
        import cloudpickle
        import submitit

        self._work, self._finish = work, finish
        _pickle_by_value(work, cloudpickle)
        self._executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=cluster)
        self.cluster = self._executor.cluster
        if partition and self.cluster != "slurm":
            raise SweepError(f"--slurm-partition {partition!r} needs the slurm cluster; submitit chose "
                             f"{self.cluster!r} (no sbatch on this machine?)")
        parameters: dict[str, Any] = {"name": job_name, "cpus_per_task": resources.cpus,
                                      "tasks_per_node": 1, "nodes": 1}
        if resources.gpus:
            if resources.gpus != int(resources.gpus):
                raise SweepError(f"SLURM allocates whole GPUs; resources.gpus is {resources.gpus:g}")
            parameters["gpus_per_node"] = int(resources.gpus)
        if resources.memory_gb:
            parameters["mem_gb"] = resources.memory_gb
        if resources.time_limit_s is not None:
            # The kernel stops itself at the limit and reports it; SLURM's own limit is the backstop.
            parameters["timeout_min"] = math.ceil(resources.time_limit_min) + 5
        if partition:
            parameters["slurm_partition"] = partition
        self._executor.update_parameters(**parameters)
        # The local cluster starts every submitted job at once: throttle to `local_runs`. SLURM queues by
        # itself; the threads here only wait for results.
        waiters = local_runs if self.cluster != "slurm" else 256
        self._pool = ThreadPoolExecutor(max_workers=waiters, thread_name_prefix="submitit")

    def _run(self, job: Any) -> Any:
        try:
            outcome = self._executor.submit(_run_remotely, self._work, job).result()
        except BaseException as error:  # FailedJobError, UncompletedJobError (timeout, preemption)
            outcome = error
        return self._finish(job, outcome)

    def submit(self, job: Any) -> Future:
        return self._pool.submit(self._run, job)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
