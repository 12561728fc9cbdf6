"""One notebook run: a `Job`, executed by `run_job` with papermill, published only when it succeeded.

`run_job` runs the notebook in its own kernel with ``figures_dir`` pointing at a private staging folder.
Only when every cell ran, and the executed copy was rendered to an HTML report, are the files moved into
the publish folder (one atomic rename per file) and the report put beside them; a failed or interrupted
notebook publishes nothing. `run` drives a list of jobs on an executor (effllm.runner.executors), prints
a line as each finishes and, on Ctrl-C / SIGTERM, stops every running kernel and reports the jobs as
``interrupted`` or ``not run``. `run_job_isolated` and `land` are the two halves of a remote run: execute
in a private folder on a worker and ship the bytes back, then put them into this repository's layout.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, as_completed, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from effllm.paths import write_atomic
from effllm.precision import DTYPE_ENV
from effllm.runner.kernels import Cancellation, kernel_manager_class, kill_process_tree  # noqa: F401 (public here too)
from effllm.runner.notebooks import (
    COMMON_PARAMETERS,
    declared_parameters,
    has_parameters_cell,
    notebook_parameters,
    read_notebook,
)
from effllm.runner.profiles import PROFILES, profile_environment, publish_dir_for
from effllm.runner.reports import REPORTS_FOLDER, render_report
from effllm.stamps import COMPARED, STAMP_SUFFIX, now, read_stamp, run_environment, run_stamp

if TYPE_CHECKING:
    pass

OK, FAILED, INTERRUPTED, NOT_RUN = "ok", "failed", "interrupted", "not run"
# The kernel's matplotlib backend: the inline one JupyterLab uses, so the executed copy (and its HTML
# report) shows every figure as the reader would see it; it draws with Agg and needs no display.
KERNEL_MPLBACKEND = "module://matplotlib_inline.backend_inline"
KERNEL_ENV = {"MPLBACKEND": KERNEL_MPLBACKEND}
# After Ctrl-C, how long `run` waits for the stopped jobs to notice their dead kernels (nbclient checks
# every second) before it reports them anyway.
INTERRUPT_GRACE_S = 30.0


@dataclass(frozen=True)
class Job:
    """One notebook run: everything `run_job` needs, picklable for a remote executor."""

    notebook: Path  # the py:percent twin, notebooks/NN_title.py
    parameters: dict[str, Any]  # exactly what papermill injects
    output_path: Path  # executed copy, build/<profile>/executed/NN_title.ipynb
    staging_dir: Path  # the notebook's figures_dir while it runs
    publish_dir: Path  # where its figures go once it succeeded
    timeout: float | None = None  # per-cell execution timeout in seconds (papermill execution_timeout)
    # Extra environment for the kernel. The hook for GPU runs: an executor that places jobs on devices
    # sets CUDA_VISIBLE_DEVICES here.
    env: dict[str, str] = field(default_factory=dict)
    time_limit: float | None = None  # seconds for the whole notebook; its kernel is killed after that
    run_id: str | None = None  # a sweep's run (its folder name); shown instead of the notebook's name
    # Where the executed copy is published as HTML (with the figures); None: no report.
    report_path: Path | None = None

    @property
    def name(self) -> str:
        return self.run_id or self.notebook.stem

    @property
    def rendered_report(self) -> Path:
        """The report as rendered, beside the executed copy, before it is published."""
        return self.output_path.with_suffix(".html")


@dataclass
class JobResult:
    notebook: str
    status: str  # "ok" | "failed" | "interrupted" | "not run"
    seconds: float
    figures: list[str]  # published files, relative to the publish folder
    error: str | None = None
    executed: str | None = None  # path of the executed copy
    report: str | None = None  # path of the published HTML report


class Executor(Protocol):
    def submit(self, job: Job) -> Future[JobResult]: ...

    def interrupt(self) -> None:
        """Ctrl-C: stop the running jobs' kernels now; the jobs then report themselves interrupted."""

    def shutdown(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# Building jobs


def build_jobs(
    notebooks: Sequence[Path],
    profile: str,
    build_dir: Path,
    overrides: dict[str, Any] | None = None,
    publish_dir: Path | None = None,
    timeout: float | None = None,
) -> tuple[list[Job], list[str]]:
    """One `Job` per notebook for `profile`, and warnings about parameters that could not be passed."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    overrides = overrides or {}
    build_dir = Path(build_dir).resolve()
    publish_dir = Path(publish_dir).resolve() if publish_dir else publish_dir_for(profile, build_dir)
    jobs, warnings, declared_anywhere = [], [], set()
    stamped = run_environment(profile)  # the profile, commit and dirty flag every artefact of this run is stamped with
    for notebook in notebooks:
        notebook = Path(notebook).resolve()
        declared = declared_parameters(notebook)
        declared_anywhere.update(declared)
        missing = [k for k in COMMON_PARAMETERS if k not in declared]
        if missing:
            warnings.append(f"{notebook.stem} does not declare the common parameter(s) {', '.join(missing)}")
        stale = [k for k in PROFILES[profile].get(notebook.stem, {}) if k not in declared]
        if stale:
            warnings.append(f"profile {profile} ({profile}.yaml), {notebook.stem}: sets {', '.join(stale)}, which "
                            f"{notebook.stem} does not declare (it declares: {', '.join(declared)})")
        staging = build_dir / profile / "staging" / notebook.stem
        jobs.append(Job(
            notebook=notebook,
            parameters=notebook_parameters(profile, notebook.stem, declared, overrides, staging),
            output_path=build_dir / profile / "executed" / f"{notebook.stem}.ipynb",
            staging_dir=staging,
            publish_dir=publish_dir,
            timeout=timeout,
            # the profile's `environment`, then what run_all itself sets
            env={**profile_environment(profile), **stamped, "EFFLLM_FIGURES": str(staging)},
            report_path=publish_dir / REPORTS_FOLDER / f"{notebook.stem}.html",
        ))
    unknown = [k for k in overrides if k not in declared_anywhere]
    if unknown:
        warnings.append(f"-p {', '.join(unknown)}: no selected notebook declares it; ignored "
                        f"(declared: {', '.join(sorted(declared_anywhere)) or 'nothing'})")
    return jobs, warnings


# ---------------------------------------------------------------------------------------------------------
# Running one job


def _move_atomic(src: Path, dst: Path) -> None:
    """Move `src` to `dst` so that `dst` is either the old file or the whole new one, never a part."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:  # another file system: copy beside the target, then rename
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
        os.close(fd)
        try:
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        src.unlink()


def publish(staging_dir: Path, publish_dir: Path) -> list[str]:
    """Move every file under `staging_dir` into `publish_dir`, keeping sub-folders; return them relative."""
    published = []
    for src in sorted(p for p in staging_dir.rglob("*") if p.is_file()):
        rel = src.relative_to(staging_dir)
        _move_atomic(src, publish_dir / rel)
        published.append(rel.as_posix())
    return published


def publish_job(job: Job) -> tuple[list[str], str | None]:
    """Publish a succeeded job: its staged files into `job.publish_dir`, then its rendered report (a copy of
    `job.rendered_report`) at `job.report_path`. Returns the files (relative) and the report's path."""
    figures = publish(job.staging_dir, job.publish_dir)
    if job.report_path is None:
        return figures, None
    write_atomic(job.report_path, job.rendered_report.read_bytes())
    return figures, str(job.report_path)


def run_job(job: Job, cancellation: Cancellation | None = None) -> JobResult:  # noqa: C901 -- to split further
    """Execute one notebook with papermill, render it to HTML and publish its figures and report if it
    succeeded. Never raises for a failing notebook; never leaves its kernel running, however it ends
    (KeyboardInterrupt included). With `cancellation` cancelled, it publishes nothing and reports
    ``interrupted`` (``not run`` when it had not started)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    cancellation = cancellation or Cancellation()
    start = time.perf_counter()
    timers: list[threading.Timer] = []
    kernels: list[Any] = []

    def result(status: str, figures: list[str], error: str | None = None, report: str | None = None) -> JobResult:
        seconds = round(time.perf_counter() - start, 2)
        if error and job.time_limit is not None and seconds >= job.time_limit:
            error = f"time limit of {job.time_limit:g} s exceeded, the kernel was stopped ({error})"
        executed = str(job.output_path) if status != NOT_RUN else None
        return JobResult(job.name, status, seconds, figures, error, executed, report)

    def interrupted() -> JobResult:
        return result(INTERRUPTED, [], "interrupted (Ctrl-C or SIGTERM): the kernel was stopped, nothing published")

    if cancellation.cancelled:
        return result(NOT_RUN, [])
    error = None
    try:
        shutil.rmtree(job.staging_dir, ignore_errors=True)  # stale files must not be published
        job.staging_dir.mkdir(parents=True)
        job.output_path.parent.mkdir(parents=True, exist_ok=True)
        job.rendered_report.unlink(missing_ok=True)  # a report always belongs to the executed copy beside it
        nb = read_notebook(job.notebook)
        if not has_parameters_cell(nb):
            return result(FAILED, [], f"{job.notebook.name} has no cell tagged 'parameters' "
                          "(add `# %% tags=[\"parameters\"]` above its parameters)")
        papermill.execute_notebook(
            nb,
            str(job.output_path),
            parameters=job.parameters,
            kernel_name="python3",
            language="python",
            progress_bar=False,
            execution_timeout=job.timeout,
            # The kernel's working folder. Not papermill's `cwd=`: that calls os.chdir, which is
            # process-wide and races between parallel jobs.
            resources={"metadata": {"path": str(job.notebook.parent)}},
            kernel_manager_class=kernel_manager_class({**KERNEL_ENV, **job.env},
                                                       job.time_limit, timers, kernels, cancellation),
        )
    except PapermillExecutionError as exc:
        error = f"{exc.ename}: {exc.evalue} (cell {exc.cell_index} of {job.output_path.name})"
    except Exception as exc:  # kernel died, timeout, unreadable notebook: a failed job, not a crashed run
        error = f"{type(exc).__name__}: {exc}"
    finally:
        for timer in timers:
            timer.cancel()
        for process in kernels:
            kill_process_tree(process)
            cancellation.discard_kernel(process)
    if cancellation.cancelled:
        return interrupted()
    if error is not None:
        return result(FAILED, [], error)
    if job.report_path is not None:
        try:
            render_report(job.output_path, job.rendered_report, title=job.notebook.stem)
        except Exception as exc:  # nbconvert failed: publish neither the figures nor a report
            return result(FAILED, [], f"rendering the HTML report failed ({type(exc).__name__}: {exc}); "
                          "nothing published")
    with cancellation.publishing() as allowed:
        if not allowed:
            return interrupted()
        try:
            figures, report = publish_job(job)
        except OSError as exc:
            return result(FAILED, [], f"publishing figures to {job.publish_dir} failed: {exc}")
    return result(OK, figures, report=report)


# ---------------------------------------------------------------------------------------------------------
# Running many jobs


def run(jobs: Sequence[Job], executor: Executor, out: TextIO | None = None) -> list[JobResult]:
    """Run `jobs` on `executor`, printing a line as each finishes; results in the order of `jobs`.

    On KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the command line) the queued jobs are
    cancelled, the executor stops the running kernels, and the results say ``interrupted`` for the jobs
    that had started and ``not run`` for the others; nothing of theirs is published."""
    out = out or sys.stdout
    futures: dict[Future[JobResult], int] = {}
    results: list[JobResult | None] = [None] * len(jobs)
    try:
        for i, job in enumerate(jobs):
            futures[executor.submit(job)] = i
        for done, future in enumerate(as_completed(futures), start=1):
            r = future.result()
            results[futures[future]] = r
            line = f"[{done}/{len(jobs)}] {r.notebook} {r.status} {r.seconds:.1f}s {len(r.figures)} figures"
            if r.error:
                line += f"\n      {r.error}"
            print(line, file=out, flush=True)
    except KeyboardInterrupt:
        running = sum(not f.done() for f in futures)
        print(f"\ninterrupted: stopping {running} running/queued job(s); nothing of theirs is published",
              file=out, flush=True)
        for future in futures:
            future.cancel()  # queued jobs never start; running ones cannot be cancelled this way
        executor.interrupt()
        wait(futures, timeout=INTERRUPT_GRACE_S)
        for future, i in futures.items():
            if results[i] is not None:
                continue
            if future.cancelled():
                results[i] = JobResult(jobs[i].name, NOT_RUN, 0.0, [])
            elif future.done() and future.exception() is None:
                results[i] = future.result()
            else:
                results[i] = JobResult(jobs[i].name, INTERRUPTED, 0.0, [],
                                       f"interrupted; still stopping after {INTERRUPT_GRACE_S:g} s")
        for i, job in enumerate(jobs):  # Ctrl-C while jobs were still being submitted
            if results[i] is None:
                results[i] = JobResult(job.name, NOT_RUN, 0.0, [])
    finally:
        executor.shutdown()
    return [r for r in results if r is not None]


def was_interrupted(results: Sequence[JobResult]) -> bool:
    return any(r.status in (INTERRUPTED, NOT_RUN) for r in results)


def format_summary(results: Sequence[JobResult], label: str = "notebook") -> str:
    width = max([len(label), *(len(r.notebook) for r in results)])
    status_width = max([6, *(len(r.status) for r in results)])
    lines = [f"{label:<{width}}  {'status':<{status_width}}  seconds  figures written",
             "-" * (width + status_width + 28)]
    for r in results:
        lines.append(f"{r.notebook:<{width}}  {r.status:<{status_width}}  {r.seconds:7.1f}  {len(r.figures)}")
    counts = {status: sum(r.status == status for r in results) for status in (OK, FAILED, INTERRUPTED, NOT_RUN)}
    tally = f"{counts[OK]} ok, {len(results) - counts[OK] - counts[INTERRUPTED] - counts[NOT_RUN]} failed"
    for status in (INTERRUPTED, NOT_RUN):
        if counts[status]:
            tally += f", {counts[status]} {status}"
    lines.append(tally)
    return "\n".join(lines)


def with_dtype(jobs: Sequence[Job], dtype: str | None) -> list[Job]:
    """``jobs`` whose kernels get ``EFFLLM_DTYPE=dtype`` (in each job's own environment, so that remote executors carry
    it); unchanged for None."""
    return list(jobs) if dtype is None else [replace(job, env={**job.env, DTYPE_ENV: dtype}) for job in jobs]


def summary_stamp(jobs: Sequence[Job], results: Sequence[JobResult], profile: str) -> dict[str, Any]:
    """The run's stamp for its summary: the one every published artefact of the run carries (what the kernels
    stamped, with their threads and environment), else the stamp this process reads with the jobs' environment."""
    found = [read_stamp(job.publish_dir / name) for job, r in zip(jobs, results, strict=False)
             for name in r.figures if name.endswith(STAMP_SUFFIX)]
    found = [stamp for stamp in found if stamp is not None]
    if found and len({tuple(str(stamp.get(k)) for k in COMPARED) for stamp in found}) == 1:
        return {k: v for k, v in found[0].items() if k not in ("files", "model_dtype")} | {"written_at": now()}
    return run_stamp(profile, environ={**os.environ, **(jobs[0].env if jobs else {})})


def write_summary(path: Path, profile: str, publish_dir: Path, results: Sequence[JobResult],
                  precision: dict[str, Any] | None = None, stamp: dict[str, Any] | None = None) -> None:
    """``summary.json``: every notebook's status, seconds, error, published files and report, the run's
    precision (:func:`effllm.models.dtype_report`: dtype, EFFLLM_DTYPE, the CPU's bfloat16 support) and its stamp
    (:mod:`effllm.stamps`; ``stamp`` as the jobs' kernels got it, else read now for ``profile``)."""
    payload = {
        "profile": profile,
        "stamp": stamp if stamp is not None else run_stamp(profile),
        "publish_dir": str(publish_dir),
        "precision": precision,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "ok": all(r.status == OK for r in results),
        "interrupted": was_interrupted(results),
        "notebooks": [asdict(r) for r in results],
    }
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------------------
# Remote runs: execute anywhere, ship the files back, land them here


def _short_error(error: BaseException, limit: int = 600) -> str:
    """One line for a remote failure (Ray and submitit errors carry whole tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(error).__name__}: {text}"[:limit]


def run_job_isolated(job: Job) -> dict[str, Any]:
    """Run `job` in a private temporary folder of the machine that calls it; return its result fields with
    the bytes of the executed notebook, of its HTML report and of every published file. What a Ray task or
    SLURM job sends back to `land`, so outputs need no file system shared with the submitting machine."""
    import platform

    with tempfile.TemporaryDirectory(prefix=f"effllm-{job.name}-") as tmp:
        folder = Path(tmp)
        staging = folder / "staging"
        parameters = dict(job.parameters)
        if "figures_dir" in parameters:
            parameters["figures_dir"] = str(staging)
        local = replace(job, parameters=parameters, output_path=folder / job.output_path.name,
                        staging_dir=staging, publish_dir=folder / "publish",
                        env={**job.env, "EFFLLM_FIGURES": str(staging)},
                        report_path=folder / "report.html" if job.report_path else None)
        result = run_job(local)
        files = {rel: (local.publish_dir / rel).read_bytes() for rel in result.figures}
        executed = local.output_path.read_bytes() if local.output_path.is_file() else None
        report = local.report_path.read_bytes() if result.report and local.report_path else None
    return {"result": asdict(result), "files": files, "executed": executed, "report": report,
            "host": platform.node()}


def land(job: Job, outcome: dict[str, Any] | BaseException) -> JobResult:
    """Put what `run_job_isolated` sent back into this repository's layout: the executed notebook at
    `job.output_path`, and (only when the run succeeded) its files published from `job.staging_dir` into
    `job.publish_dir` and its report at `job.report_path`. `outcome` is the exception instead when the task
    or job itself failed."""
    if isinstance(outcome, BaseException):
        return JobResult(job.name, FAILED, 0.0, [], _short_error(outcome), None)
    fields = outcome["result"]
    executed = None
    if outcome.get("executed") is not None:
        write_atomic(job.output_path, outcome["executed"])
        executed = str(job.output_path)
    if fields["status"] != OK:
        status = fields["status"] if fields["status"] in (INTERRUPTED, NOT_RUN) else FAILED
        return JobResult(job.name, status, fields["seconds"], [], fields["error"], executed)
    shutil.rmtree(job.staging_dir, ignore_errors=True)
    for rel, data in outcome["files"].items():
        write_atomic(job.staging_dir / rel, data)
    if job.report_path is not None:
        if outcome.get("report") is None:
            return JobResult(job.name, FAILED, fields["seconds"], [], "the run sent back no HTML report", executed)
        write_atomic(job.rendered_report, outcome["report"])
    try:
        figures, report = publish_job(job)
    except OSError as exc:
        return JobResult(job.name, FAILED, fields["seconds"], [],
                         f"publishing figures to {job.publish_dir} failed: {exc}", executed)
    return JobResult(job.name, OK, fields["seconds"], figures, None, executed, report)
