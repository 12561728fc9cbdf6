#!/usr/bin/env python
"""Run the notebooks headlessly with papermill and regenerate their figures.

    python run_all.py                          # every notebook, default profile -> figures/
    python run_all.py --profile smoke          # tiny sizes, seconds per notebook -> build/smoke/figures/
    python run_all.py --only 00 -p max_new_tokens=32
    python run_all.py --profile paper --jobs 2 # the papers' models, on a GPU -> figures/paper/

Each notebook ``notebooks/NN_title.py`` (the jupytext twin of ``NN_title.ipynb``) becomes one `Job`.
The job runs in its own kernel with ``figures_dir`` pointing at a private staging folder; only when the
notebook finishes without error are its files moved into the profile's publish folder, so a failed
notebook never leaves half-written figures behind. Executed copies go to ``build/<profile>/executed/``
and a summary to ``build/<profile>/summary.json``; the exit code is 1 when any notebook failed.

Executors: `run_job` is a pure, picklable function of a `Job`; an executor only has to call it somewhere
and hand back a `concurrent.futures.Future`. `LocalExecutor` uses threads (each papermill run already
starts its kernel in its own process); a Ray or SLURM executor can implement the same two methods.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import yaml

if TYPE_CHECKING:
    from nbformat import NotebookNode

REPO_ROOT = Path(__file__).resolve().parent
NOTEBOOK_PATTERN = "[0-9][0-9]_*.py"
COMMON_PARAMETERS = ("profile", "model_name", "seed", "figures_dir")
# Set by run_all.py itself for every job; `-p` may not override them.
RESERVED_PARAMETERS = ("profile", "figures_dir")

# profile -> {"common": parameters every notebook gets, "<notebook stem>": that notebook's overrides}.
# Only the parameters a notebook declares in its `parameters` cell are passed to it.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    # Tiny random model, a handful of tokens: seconds per notebook; what tests run.
    "smoke": {
        "common": {"model_name": "tiny-llama", "seed": 0},
        "00_quickstart": {"max_new_tokens": 8, "lens_sequences": 2, "lens_seq_len": 32},
    },
    # The embedded SmolLM2-135M on a 2-core CPU: minutes per notebook; what `make run` runs.
    "default": {
        "common": {"model_name": "smollm2-135m", "seed": 0},
        "00_quickstart": {"max_new_tokens": 64, "lens_sequences": 8, "lens_seq_len": 256},
    },
    # The papers' own models and hub data sets, on GPUs (needs the hub: HF_TOKEN for gated models).
    "paper": {
        "common": {"model_name": "meta-llama/Llama-3.2-1B", "seed": 0},
        "00_quickstart": {"max_new_tokens": 128, "lens_sequences": 32, "lens_seq_len": 1024},
    },
}


def publish_dir_for(profile: str, build_dir: Path) -> Path:
    """Where a profile's figures are published: smoke never touches figures/."""
    return {
        "smoke": build_dir / "smoke" / "figures",
        "default": REPO_ROOT / "figures",
        "paper": REPO_ROOT / "figures" / "paper",
    }[profile]


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

    @property
    def name(self) -> str:
        return self.notebook.stem


@dataclass
class JobResult:
    notebook: str
    status: str  # "ok" | "failed"
    seconds: float
    figures: list[str]  # published files, relative to the publish folder
    error: str | None = None
    executed: str | None = None  # path of the executed copy


class Executor(Protocol):
    def submit(self, job: Job) -> Future[JobResult]: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Runs jobs on this machine, `jobs` notebooks at a time."""

    def __init__(self, jobs: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="notebook")

    def submit(self, job: Job) -> Future[JobResult]:
        return self._pool.submit(run_job, job)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------
# Notebooks and parameters


def discover_notebooks(notebooks_dir: Path) -> list[Path]:
    """The py:percent twins ``NN_title.py`` in reading order."""
    return sorted(notebooks_dir.glob(NOTEBOOK_PATTERN))


def read_notebook(path: Path) -> NotebookNode:
    """A notebook from its py:percent (or .ipynb) file, with a kernelspec papermill can use."""
    import jupytext

    nb = jupytext.read(path)
    # papermill needs a kernel to parse the parameters cell; a twin without a jupytext header has none.
    nb.metadata.setdefault(
        "kernelspec", {"name": "python3", "language": "python", "display_name": "Python 3"}
    )
    return nb


def has_parameters_cell(nb: NotebookNode) -> bool:
    return any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells)


def declared_parameters(path: Path) -> list[str]:
    """Names assigned in the notebook's cell tagged ``parameters`` (empty when it has none)."""
    import papermill

    return list(papermill.inspect_notebook(read_notebook(path)))


def select_notebooks(notebooks: Sequence[Path], names: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Notebooks matching any of `names` (stem, NN prefix or title), and the names that matched none."""
    selected: set[Path] = set()
    unmatched = []
    for raw in names:
        name = Path(raw).stem if raw.endswith((".py", ".ipynb")) else raw
        hits = [nb for nb in notebooks if name in (nb.stem, nb.stem[:2], nb.stem[3:])]
        if hits:
            selected.update(hits)
        else:
            unmatched.append(raw)
    return [nb for nb in notebooks if nb in selected], unmatched


def notebook_parameters(
    profile: str, stem: str, declared: Sequence[str], overrides: dict[str, Any], figures_dir: Path
) -> dict[str, Any]:
    """The parameters to inject into one notebook: only those it declares.

    Precedence: profile common < profile per-notebook < `overrides` (-p); run_all sets ``profile`` and
    ``figures_dir``.
    """
    table = PROFILES[profile]
    wanted = {"profile": profile, **table["common"], **table.get(stem, {}), **overrides}
    wanted.update(profile=profile, figures_dir=str(figures_dir))
    return {k: v for k, v in wanted.items() if k in declared}


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
    for notebook in notebooks:
        notebook = Path(notebook).resolve()
        declared = declared_parameters(notebook)
        declared_anywhere.update(declared)
        missing = [k for k in COMMON_PARAMETERS if k not in declared]
        if missing:
            warnings.append(f"{notebook.stem} does not declare the common parameter(s) {', '.join(missing)}")
        stale = [k for k in PROFILES[profile].get(notebook.stem, {}) if k not in declared]
        if stale:
            warnings.append(f"PROFILES[{profile!r}][{notebook.stem!r}] sets {', '.join(stale)}, which "
                            f"{notebook.stem} does not declare (it declares: {', '.join(declared)})")
        staging = build_dir / profile / "staging" / notebook.stem
        jobs.append(
            Job(
                notebook=notebook,
                parameters=notebook_parameters(profile, notebook.stem, declared, overrides, staging),
                output_path=build_dir / profile / "executed" / f"{notebook.stem}.ipynb",
                staging_dir=staging,
                publish_dir=publish_dir,
                timeout=timeout,
                env={"EFFLLM_FIGURES": str(staging)},
            )
        )
    unknown = [k for k in overrides if k not in declared_anywhere]
    if unknown:
        warnings.append(f"-p {', '.join(unknown)}: no selected notebook declares it; ignored "
                        f"(declared: {', '.join(sorted(declared_anywhere)) or 'nothing'})")
    return jobs, warnings


# ---------------------------------------------------------------------------------------------------------
# Running one job


def _kernel_manager_class(env: dict[str, str]):
    """An AsyncKernelManager that starts its kernel with `env` added to this process's environment.

    Per kernel rather than through os.environ, so parallel jobs cannot see each other's settings.
    """
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

    return KernelManager


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


def run_job(job: Job) -> JobResult:
    """Execute one notebook with papermill and publish its figures if it succeeded. Never raises."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    start = time.perf_counter()

    def result(status: str, figures: list[str], error: str | None = None) -> JobResult:
        seconds = round(time.perf_counter() - start, 2)
        return JobResult(job.name, status, seconds, figures, error, str(job.output_path))

    try:
        shutil.rmtree(job.staging_dir, ignore_errors=True)  # stale files must not be published
        job.staging_dir.mkdir(parents=True)
        job.output_path.parent.mkdir(parents=True, exist_ok=True)
        nb = read_notebook(job.notebook)
        if not has_parameters_cell(nb):
            return result("failed", [], f"{job.notebook.name} has no cell tagged 'parameters' "
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
            kernel_manager_class=_kernel_manager_class({"MPLBACKEND": "Agg", **job.env}),
        )
    except PapermillExecutionError as exc:
        return result("failed", [], f"{exc.ename}: {exc.evalue} (cell {exc.cell_index} of {job.output_path.name})")
    except Exception as exc:  # kernel died, timeout, unreadable notebook: a failed job, not a crashed run
        return result("failed", [], f"{type(exc).__name__}: {exc}")
    try:
        figures = publish(job.staging_dir, job.publish_dir)
    except OSError as exc:
        return result("failed", [], f"publishing figures to {job.publish_dir} failed: {exc}")
    return result("ok", figures)


def run(jobs: Sequence[Job], executor: Executor, out: TextIO | None = None) -> list[JobResult]:
    """Run `jobs` on `executor`, printing a line as each finishes; results in the order of `jobs`."""
    out = out or sys.stdout
    futures = {executor.submit(job): i for i, job in enumerate(jobs)}
    results: list[JobResult | None] = [None] * len(jobs)
    try:
        for done, future in enumerate(as_completed(futures), start=1):
            r = future.result()
            results[futures[future]] = r
            line = f"[{done}/{len(jobs)}] {r.notebook} {r.status} {r.seconds:.1f}s {len(r.figures)} figures"
            if r.error:
                line += f"\n      {r.error}"
            print(line, file=out, flush=True)
    finally:
        executor.shutdown()
    return [r for r in results if r is not None]


def format_summary(results: Sequence[JobResult]) -> str:
    width = max([len("notebook"), *(len(r.notebook) for r in results)])
    lines = [f"{'notebook':<{width}}  status  seconds  figures written", "-" * (width + 34)]
    for r in results:
        lines.append(f"{r.notebook:<{width}}  {r.status:<6}  {r.seconds:7.1f}  {len(r.figures)}")
    failed = sum(r.status != "ok" for r in results)
    lines.append(f"{len(results) - failed} ok, {failed} failed")
    return "\n".join(lines)


def write_summary(path: Path, profile: str, publish_dir: Path, results: Sequence[JobResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "profile": profile,
        "publish_dir": str(publish_dir),
        "ok": all(r.status == "ok" for r in results),
        "notebooks": [asdict(r) for r in results],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _jobs_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 (notebooks run at once), got {text!r}")
    return value


def _timeout_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _parameter_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY a Python name (e.g. -p max_new_tokens=32), got {text!r}"
        )
    if key in RESERVED_PARAMETERS:
        raise argparse.ArgumentTypeError(
            f"{key!r} is set by run_all.py; use --profile, or --figures-dir for where figures go"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0]
        raise argparse.ArgumentTypeError(
            f"value of {text!r} is not a YAML/JSON literal ({first_line}); quote it, e.g. -p {key}='\"...\"'"
        ) from None
    return key, value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the notebooks with papermill and regenerate their figures.",
        epilog="Profiles: "
        + "; ".join(f"{name}: model {table['common']['model_name']}" for name, table in PROFILES.items()),
    )
    parser.add_argument("--profile", default="default", choices=list(PROFILES),
                        help="parameter set and figure folder (default: %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="notebooks to run: stem (00_quickstart), NN prefix (00) or title (quickstart)")
    parser.add_argument("--jobs", "-j", type=_jobs_arg, default=1, metavar="N", help="notebooks run at once (default: 1)")
    parser.add_argument("--list", action="store_true",
                        help="print the notebooks and the parameters they would get, then exit")
    parser.add_argument("-p", "--parameter", dest="parameters", action="append", type=_parameter_arg,
                        default=[], metavar="KEY=VALUE",
                        help="override a notebook parameter; VALUE is a YAML/JSON literal (repeatable)")
    parser.add_argument("--build-dir", type=Path, default=REPO_ROOT / "build",
                        help="executed notebooks, staging folders and summary.json (default: build/)")
    parser.add_argument("--notebooks-dir", type=Path, default=REPO_ROOT / "notebooks",
                        help="folder of NN_title.py notebooks (default: notebooks/)")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="publish figures here instead of the profile's folder "
                        "(smoke: build/smoke/figures, default: figures, paper: figures/paper)")
    parser.add_argument("--timeout", type=_timeout_arg, default=None, metavar="SECONDS",
                        help="fail a notebook when one cell runs longer than this (default: no limit)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    notebooks_dir = args.notebooks_dir.resolve()
    notebooks = discover_notebooks(notebooks_dir)
    if not notebooks:
        parser.error(f"no notebooks in {notebooks_dir} (looked for {NOTEBOOK_PATTERN}, "
                     "the jupytext twins of NN_title.ipynb)")
    if args.only:
        notebooks, unmatched = select_notebooks(notebooks, args.only)
        if unmatched:
            available = ", ".join(nb.stem for nb in discover_notebooks(notebooks_dir))
            parser.error(f"--only: no notebook matches {', '.join(map(repr, unmatched))}; "
                         f"notebooks: {available} (give a stem, its NN prefix or its title)")

    build_dir = args.build_dir.resolve()
    jobs, warnings = build_jobs(notebooks, args.profile, build_dir, dict(args.parameters),
                                args.figures_dir, args.timeout)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.list:
        for job in jobs:
            shown = {k: v for k, v in job.parameters.items() if k != "figures_dir"}
            print(f"{job.name:<24} {json.dumps(shown)}")
        return 0

    publish_dir = jobs[0].publish_dir
    print(f"running {len(jobs)} notebook(s), profile {args.profile}, {args.jobs} at a time; "
          f"figures -> {publish_dir}", flush=True)
    results = run(jobs, LocalExecutor(args.jobs))
    summary_path = build_dir / args.profile / "summary.json"
    write_summary(summary_path, args.profile, publish_dir, results)
    print()
    print(format_summary(results))
    print(f"executed notebooks in {build_dir / args.profile / 'executed'}; summary in {summary_path}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
