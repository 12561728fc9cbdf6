"""The kernels of notebook runs (:mod:`effllm.runner.jobs`): killing a kernel with everything it started,
Ctrl-C for a set of jobs (:class:`Cancellation`), and the kernel manager that starts each kernel with its job's
environment and time limit.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil


def kill_process_tree(process: psutil.Process) -> None:
    """Kill a kernel and everything it started: its descendants, and its process group (jupyter_client
    starts each kernel in a session of its own, so the group is the kernel's alone). Nothing happens when
    the process has exited, even if its pid was given to another process since (psutil checks)."""
    import psutil

    try:
        if not process.is_running():
            return
        children = process.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    try:
        group = os.getpgid(process.pid)
        if group == process.pid and group != os.getpgid(0):  # never our own group
            os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for member in (process, *children):  # a descendant that made a session of its own is outside the group
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass


class Cancellation:
    """Ctrl-C for a set of jobs. `cancel` kills every registered kernel at once, kernels registered later
    are killed as they start, and `publishing` lets a job publish only while the set is not cancelled (a
    job publishing when Ctrl-C comes finishes its renames first: it is published whole, or not at all)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._kernels: set[Any] = set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            kernels = list(self._kernels)
        for process in kernels:
            kill_process_tree(process)

    def add_kernel(self, process: psutil.Process) -> None:
        with self._lock:
            if not self._cancelled:
                self._kernels.add(process)
                return
        kill_process_tree(process)

    def discard_kernel(self, process: psutil.Process) -> None:
        with self._lock:
            self._kernels.discard(process)

    @contextmanager
    def publishing(self) -> Iterator[bool]:
        """``with c.publishing() as allowed:`` publish only when ``allowed``; Ctrl-C waits for the block."""
        with self._lock:
            yield not self._cancelled


def kernel_manager_class(env: dict[str, str], time_limit: float | None, timers: list[threading.Timer],
                          kernels: list[Any], cancellation: Cancellation):
    """An AsyncKernelManager that starts its kernel with `env` added to this process's environment.

    Per kernel rather than through os.environ, so parallel jobs cannot see each other's settings. Each
    kernel process goes into `kernels` (the job kills it when it ends, however it ends) and into
    `cancellation` (Ctrl-C kills it). With `time_limit`, the kernel is killed that many seconds after it
    started (papermill then fails the notebook with DeadKernelError); the timer goes into `timers`.
    """
    import psutil
    import zmq
    from jupyter_client import AsyncKernelManager

    class KernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:
            kw["env"] = {**os.environ, **kw.get("env", {}), **env}
            # Encrypt the local kernel's sockets where jupyter_client can (>= 8.10); this also keeps
            # ipykernel's "running over TCP without encryption" warning out of the log.
            if hasattr(self, "transport_encryption") and zmq.has("curve"):
                self.transport_encryption = "auto"
            await super().start_kernel(**kw)
            pid = getattr(self.provisioner, "pid", None)
            if pid is None:
                return
            try:
                process = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return
            kernels.append(process)
            cancellation.add_kernel(process)
            if time_limit is not None:
                timer = threading.Timer(time_limit, kill_process_tree, args=(process,))
                timer.daemon = True
                timer.start()
                timers.append(timer)

    return KernelManager
