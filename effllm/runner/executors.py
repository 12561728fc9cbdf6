"""Where jobs execute: this machine (threads), Ray (a task per run) or SLURM (a job per run, via submitit).

An executor takes a `Job` and hands back a `concurrent.futures.Future` of its `JobResult`; `interrupt`
stops what runs (Ctrl-C) and `shutdown` waits for the rest. No scheduler is written here:
:class:`RayExecutor` submits every run as a Ray task with its CPUs, GPUs and memory, and
:class:`SubmititExecutor` as a SLURM job through ``submitit.AutoExecutor`` (or submitit's local cluster,
for tests). Both call a picklable ``work(job)`` where the run executes (`run_job_isolated`) and a
``finish(job, outcome)`` on the submitting machine when it ends (`land`). Ray and submitit are imported
only when such an executor is made (``pip install -e ".[scale]"``).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from effllm.runner.jobs import INTERRUPTED, NOT_RUN, Cancellation, Job, JobResult, run_job
from effllm.runner.sweeps import Resources, SweepError


class LocalExecutor:
    """Runs jobs on this machine, `jobs` notebooks at a time (threads: each papermill run already starts
    its kernel in a process of its own). `interrupt` kills every running kernel at once."""

    def __init__(self, jobs: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="notebook")
        self.cancellation = Cancellation()

    def submit(self, job: Job) -> Future[JobResult]:
        return self._pool.submit(run_job, job, self.cancellation)

    def interrupt(self) -> None:
        self.cancellation.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _interrupted(job: Job) -> JobResult:
    return JobResult(job.name, INTERRUPTED, 0.0, [], "interrupted (Ctrl-C or SIGTERM): the run was cancelled, "
                     "nothing published")


def _pickle_by_value(function: Callable, pickler: Any) -> None:
    """Ship ``function``'s module by value when a worker could not import it (a script or a test module);
    effllm's own modules are imported on the worker, which has effllm installed."""
    module = sys.modules.get(function.__module__)
    if module is not None and module.__name__ != "__main__" and not module.__name__.startswith("effllm"):
        pickler.register_pickle_by_value(module)


def _run_remotely(work: Callable[[Any], Any], job: Any) -> Any:
    return work(job)


def _settle(out: Future, finish: Callable[[Any, Any], Any], job: Any, outcome: Any,
            cancellation: Cancellation) -> None:
    """Turn a remote outcome into the driver's result on `out`, never leaving it unset; after Ctrl-C the
    outcome is not landed (nothing published) and the run reports itself interrupted."""
    try:
        with cancellation.publishing() as allowed:
            out.set_result(finish(job, outcome) if allowed else _interrupted(job))
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
        self.cancellation = Cancellation()
        self._refs: set[Any] = set()
        self._refs_lock = threading.Lock()
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
        with self._refs_lock:
            self._refs.add(ref)
        out: Future = Future()
        # Submitted is running, as far as the driver can tell: Future.cancel() must not take it back.
        out.set_running_or_notify_cancel()
        timer = None
        if self._limit is not None:
            # The kernel stops itself at the limit (Job.time_limit); this is the backstop for a task that
            # never started its kernel or hangs elsewhere, counted from submission.
            timer = threading.Timer(self._limit * 2 + 60, lambda: self._ray.cancel(ref, force=True))
            timer.daemon = True
            timer.start()

        def done(future: Future) -> None:
            if timer is not None:
                timer.cancel()
            with self._refs_lock:
                self._refs.discard(ref)
            try:
                outcome = future.result()
            except BaseException as error:  # task error, worker died, cancelled
                outcome = error
            _settle(out, self._finish, job, outcome, self.cancellation)

        ref.future().add_done_callback(done)
        return out

    def interrupt(self) -> None:
        """Cancel every unfinished task. A running one gets KeyboardInterrupt, and `run_job` kills its
        kernel on the way out (a forced cancel would kill the worker and orphan the kernel)."""
        self.cancellation.cancel()
        with self._refs_lock:
            refs = list(self._refs)
        for ref in refs:
            try:
                self._ray.cancel(ref, force=False)
            except Exception:  # already finished, or the cluster is going away: nothing left to stop
                pass

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
        self.cancellation = Cancellation()
        self._handles: list[Any] = []
        self._handles_lock = threading.Lock()
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
        if self.cancellation.cancelled:
            return JobResult(job.name, NOT_RUN, 0.0, [])
        try:
            handle = self._executor.submit(_run_remotely, self._work, job)
            with self._handles_lock:
                self._handles.append(handle)
            if self.cancellation.cancelled:  # Ctrl-C came while this one was being submitted
                handle.cancel(check=False)
            outcome = handle.result()
        except BaseException as error:  # FailedJobError, UncompletedJobError (timeout, preemption)
            outcome = error
        with self.cancellation.publishing() as allowed:
            return self._finish(job, outcome) if allowed else _interrupted(job)

    def submit(self, job: Any) -> Future:
        return self._pool.submit(self._run, job)

    def interrupt(self) -> None:
        """scancel every submitted job (submitit's local cluster sends SIGINT: `run_job` kills its kernel
        on the way out); runs not yet submitted are never submitted."""
        self.cancellation.cancel()
        with self._handles_lock:
            handles = list(self._handles)
        for handle in handles:
            try:
                handle.cancel(check=False)
            except Exception:  # finished already, or scancel is not reachable: nothing more to do here
                pass

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
