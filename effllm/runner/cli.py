"""The command line of run_all.py: options, the notebook run and the sweep run, exit codes.

    python run_all.py                          # every notebook, default profile -> figures/
    python run_all.py --profile smoke          # tiny sizes, seconds per notebook -> build/smoke/figures/
    python run_all.py --only 00 -p max_new_tokens=32
    python run_all.py --profile paper --jobs 2 # the papers' models, on a GPU -> figures/paper/
    python run_all.py --sweep sweeps/wanda_calibration_sets.yaml --executor ray|slurm|local

Exit codes: 0 every notebook ok; 1 some notebook failed; 2 bad input (the message says what was given and
what is allowed); 130 interrupted (Ctrl-C or SIGTERM: the running kernels are killed, nothing of theirs is
published, and the summary records them as ``interrupted`` and the others as ``not run``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from effllm.precision import DTYPE_CHOICES, DTYPE_ENV
from effllm.runner.executors import LocalExecutor
from effllm.runner.jobs import (
    Executor,
    build_jobs,
    format_summary,
    land,
    run,
    run_job_isolated,
    summary_stamp,
    was_interrupted,
    with_dtype,
    write_summary,
)
from effllm.runner.notebooks import NOTEBOOK_PATTERN, discover_notebooks, select_notebooks
from effllm.runner.profiles import PROFILES, REPO_ROOT, RESERVED_PARAMETERS, publish_dir_for
from effllm.runner.reports import REPORTS_FOLDER
from effllm.runner.sweeps import (
    Sweep,
    SweepError,
    build_sweep_jobs,
    load_sweep,
    sweep_publish_dir,
    write_sweep_summary,
)

EXECUTOR_NAMES = ("local", "ray", "slurm")  # --executor, for sweeps
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C


# ---------------------------------------------------------------------------------------------------------
# Option values


def _jobs_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 (notebooks run at once), got {text!r}")
    return value


def _timeout_arg(text: str) -> int:
    # Whole seconds: nbclient's per-cell timeout is an integer, and a fraction used to reach it and fail
    # every notebook with a TraitError.
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of seconds >= 1 (the limit for one cell), got {text!r}; fractions of a "
            "second are not allowed (e.g. --timeout 3)")
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


def make_parser(repo_root: Path = REPO_ROOT) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_all.py",
        description="Run the notebooks with papermill, regenerate their figures and publish each executed "
        f"notebook as an HTML report (<figures>/{REPORTS_FOLDER}/NN_title.html).",
        epilog="Profiles (effllm/runner/profiles/NAME.yaml): "
        + "; ".join(f"{name}: model {table['common'].get('model_name', '-')}" for name, table in PROFILES.items())
        + ". Exit codes: 0 all ok, 1 a notebook failed, 2 bad input, 130 interrupted (Ctrl-C, SIGTERM).",
    )
    parser.add_argument("--profile", default=None, choices=list(PROFILES),
                        help="parameter set and figure folder (default: the sweep file's profile, else default)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="notebooks to run: stem (00_quickstart), NN prefix (00) or title (quickstart)")
    parser.add_argument("--jobs", "-j", type=_jobs_arg, default=1, metavar="N", help="notebooks run at once (default: 1)")
    parser.add_argument("--list", action="store_true",
                        help="print the notebooks and the parameters they would get, then exit")
    parser.add_argument("-p", "--parameter", dest="parameters", action="append", type=_parameter_arg,
                        default=[], metavar="KEY=VALUE",
                        help="override a notebook parameter; VALUE is a YAML/JSON literal (repeatable)")
    parser.add_argument("--build-dir", type=Path, default=repo_root / "build",
                        help="executed notebooks, staging folders and summary.json (default: build/)")
    parser.add_argument("--notebooks-dir", type=Path, default=repo_root / "notebooks",
                        help="folder of NN_title.py notebooks (default: notebooks/)")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="publish figures and reports here instead of the profile's folder "
                        "(smoke: build/smoke/figures, default: figures, paper: figures/paper)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="precision of every model the notebooks load without a dtype of their own: sets "
                        f"{DTYPE_ENV} for every kernel (default: the {DTYPE_ENV} of this shell, else auto = bfloat16 "
                        "where the CPU or GPU computes in it natively, float32 elsewhere)")
    parser.add_argument("--timeout", type=_timeout_arg, default=None, metavar="SECONDS",
                        help="fail a notebook when one cell runs longer than this many whole seconds "
                        "(default: no limit)")
    scale = parser.add_argument_group("sweeps (see README, Running at scale)")
    scale.add_argument("--sweep", type=Path, metavar="FILE",
                       help="run one notebook over the parameter grid of a YAML sweep file")
    scale.add_argument("--executor", choices=EXECUTOR_NAMES, default="local",
                       help="where sweep runs execute: local (--jobs at once), ray (a task per run), "
                       "slurm (a job per run through submitit) (default: %(default)s)")
    scale.add_argument("--address", metavar="ADDR",
                       help="ray: a running cluster (ray://HOST:10001 or HOST:6379); default: start a local Ray "
                       "with room for --jobs runs")
    scale.add_argument("--slurm-partition", metavar="NAME", help="slurm: the partition to submit to")
    scale.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default="slurm",
                       help="slurm: submitit's cluster; 'local' runs the jobs as local processes, through the same "
                       "submission path (for tests and machines without SLURM) (default: %(default)s)")
    return parser


# ---------------------------------------------------------------------------------------------------------
# Signals


class _SignalGuard:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread once; `run` turns that into stopped
    kernels and interrupted results. Any later signal is only acknowledged, so the clean-up it started
    (killing kernels, writing the summary) is never cut short."""

    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.stopping:
            print(f"{signal.Signals(signum).name}: already stopping; the summary is being written",
                  file=sys.stderr, flush=True)
            return
        self.stopping = True
        raise KeyboardInterrupt


@contextmanager
def _stop_on_signals() -> Iterator[_SignalGuard]:
    guard = _SignalGuard()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield guard
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, guard)
    try:
        yield guard
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------
# Main


def main(argv: Sequence[str] | None = None, repo_root: Path | None = None) -> int:
    """run_all.py: returns the exit code (0 ok, 1 a notebook failed, 130 interrupted); bad input exits 2.
    ``repo_root`` (run_all.py passes its own folder) holds notebooks/, figures/ and build/."""
    repo_root = Path(repo_root).resolve() if repo_root else REPO_ROOT
    with _stop_on_signals() as guard:
        try:
            return _main(argv, repo_root, guard)
        except KeyboardInterrupt:
            guard.stopping = True
            print("\ninterrupted before any notebook started: nothing ran, nothing was published",
                  file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED


def _precision(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Apply ``--dtype`` to this process (kernels inherit it), print the precision once, return it for the summary."""
    from effllm.models import dtype_line, dtype_report  # torch: only once notebooks are about to run

    if args.dtype is not None:
        os.environ[DTYPE_ENV] = args.dtype
    try:
        report = dtype_report()
    except ValueError as error:  # a bad EFFLLM_DTYPE in the shell: say so before any notebook starts
        parser.error(str(error))
    print(dtype_line(), flush=True)
    return report


def _main(argv: Sequence[str] | None, repo_root: Path, guard: _SignalGuard) -> int:
    parser = make_parser(repo_root)
    args = parser.parse_args(argv)
    if args.list:
        args.dtype_report = None
    else:
        args.dtype_report = _precision(args, parser)
    notebooks_dir = args.notebooks_dir.resolve()
    notebooks = discover_notebooks(notebooks_dir)
    if not notebooks:
        parser.error(f"no notebooks in {notebooks_dir} (looked for {NOTEBOOK_PATTERN}, "
                     "the jupytext twins of NN_title.ipynb)")
    if args.sweep is not None:
        return main_sweep(parser, args, notebooks, repo_root, guard)
    if args.executor != "local" or args.address or args.slurm_partition:
        parser.error("--executor, --address and --slurm-partition apply to sweeps; give --sweep FILE")
    args.profile = args.profile or "default"
    if args.only:
        notebooks, unmatched = select_notebooks(notebooks, args.only)
        if unmatched:
            available = ", ".join(nb.stem for nb in discover_notebooks(notebooks_dir))
            parser.error(f"--only: no notebook matches {', '.join(map(repr, unmatched))}; "
                         f"notebooks: {available} (give a stem, its NN prefix or its title)")

    build_dir = args.build_dir.resolve()
    publish_dir = (args.figures_dir.resolve() if args.figures_dir
                   else publish_dir_for(args.profile, build_dir, repo_root))
    jobs, warnings = build_jobs(notebooks, args.profile, build_dir, dict(args.parameters), publish_dir, args.timeout)
    jobs = with_dtype(jobs, args.dtype)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.list:
        for job in jobs:
            shown = {k: v for k, v in job.parameters.items() if k != "figures_dir"}
            print(f"{job.name:<24} {json.dumps(shown)}")
        return 0

    print(f"running {len(jobs)} notebook(s), profile {args.profile}, {args.jobs} at a time; "
          f"figures -> {publish_dir}, reports -> {publish_dir / REPORTS_FOLDER}", flush=True)
    results = run(jobs, LocalExecutor(args.jobs))
    guard.stopping = True  # from here on a signal must not cut the summary short
    summary_path = build_dir / args.profile / "summary.json"
    write_summary(summary_path, args.profile, publish_dir, results, precision=args.dtype_report,
                  stamp=summary_stamp(jobs, results, args.profile))
    print()
    print(format_summary(results))
    print(f"executed notebooks in {build_dir / args.profile / 'executed'}; summary in {summary_path}")
    if was_interrupted(results):
        return EXIT_INTERRUPTED
    return 0 if all(r.status == "ok" for r in results) else 1


def make_sweep_executor(args: argparse.Namespace, sweep: Sweep, runs_dir: Path) -> Executor:
    """The executor `--executor` names, sized from the sweep's resources (Ray / submitit imported here)."""
    from effllm.runner.executors import RayExecutor, SubmititExecutor

    if args.executor == "local":
        return LocalExecutor(args.jobs)
    if args.executor == "ray":
        return RayExecutor(run_job_isolated, land, sweep.resources, address=args.address, local_runs=args.jobs)
    return SubmititExecutor(run_job_isolated, land, sweep.resources, folder=runs_dir / "submitit",
                            cluster=args.slurm_cluster, partition=args.slurm_partition, local_runs=args.jobs,
                            job_name=f"effllm-{sweep.name}")


def main_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace, notebooks: Sequence[Path],
               repo_root: Path = REPO_ROOT, guard: _SignalGuard | None = None) -> int:
    """`run_all.py --sweep FILE`: every grid point of the sweep file is one run of its notebook."""
    if args.only:
        parser.error("--only does not go with --sweep: the sweep file names its notebook")
    if args.executor != "ray" and args.address:
        parser.error(f"--address is for --executor ray; got --executor {args.executor}")
    if args.executor != "slurm" and args.slurm_partition:
        parser.error(f"--slurm-partition is for --executor slurm; got --executor {args.executor}")
    if args.executor == "slurm" and args.slurm_cluster == "slurm" and shutil.which("sbatch") is None:
        parser.error("--executor slurm: no SLURM on this machine (sbatch not found); run on a login node, or "
                     "use --slurm-cluster local to run the jobs here through submitit")
    try:
        sweep = load_sweep(args.sweep)
        if args.profile and sweep.profile and args.profile != sweep.profile:
            print(f"note: --profile {args.profile} replaces the sweep file's profile {sweep.profile}",
                  file=sys.stderr)
        profile = args.profile or sweep.profile or "default"
        build_dir = args.build_dir.resolve()
        publish_root = (args.figures_dir.resolve() if args.figures_dir
                        else publish_dir_for(profile, build_dir, repo_root))
        jobs, points = build_sweep_jobs(sweep, notebooks, profile, build_dir, dict(args.parameters),
                                        publish_root, args.timeout)
        jobs = with_dtype(jobs, args.dtype)
    except SweepError as error:
        parser.error(str(error))
    figures_root = sweep_publish_dir(sweep.name, profile, build_dir, publish_root)
    runs_dir = build_dir / profile / "sweeps" / sweep.name
    if args.list:
        for job in jobs:
            shown = {k: v for k, v in job.parameters.items() if k != "figures_dir"}
            print(f"{job.run_id}  {json.dumps(shown)}")
        return 0
    try:
        executor = make_sweep_executor(args, sweep, runs_dir)
    except ImportError as error:
        parser.error(f"--executor {args.executor} needs {error.name}: pip install -e \".[scale]\" (ray, submitit)")
    except SweepError as error:
        parser.error(str(error))
    r = sweep.resources
    print(f"sweep {sweep.name}: {len(jobs)} run(s) of {jobs[0].notebook.stem}, profile {profile}, executor "
          f"{args.executor}; each run: {r.cpus} cpu, {r.gpus:g} gpu, memory {r.memory_gb or '-'} GB, "
          f"time limit {r.time_limit_min or '-'} min; figures and reports -> {figures_root}", flush=True)
    results = run(jobs, executor)
    if guard is not None:
        guard.stopping = True
    json_path, csv_path = write_sweep_summary(figures_root, sweep, profile, args.executor, jobs, points, results)
    print()
    print(format_summary(results, label="run"))
    print(f"executed notebooks in {runs_dir}; summary in {json_path} and {csv_path.name}")
    if was_interrupted(results):
        return EXIT_INTERRUPTED
    code = 0 if all(r.status == "ok" for r in results) else 1
    if sweep.summary is not None:
        code = max(code, run_sweep_summary(sweep, figures_root, results))
    return code


def run_sweep_summary(sweep: Sweep, figures_root: Path, results: Sequence[Any]) -> int:
    """The sweep file's `summary` step over the ok runs (effllm.runner.summaries): 0 done, 1 failed."""
    from effllm.io import ArtifactError
    from effllm.pruning import MaskMismatchError
    from effllm.runner.summaries import SummaryError, run_summary

    print(f"\nsummary step {sweep.summary.kind} over {sum(r.status == 'ok' for r in results)} ok run(s); again "
          f"later with: python -m effllm.runner.summaries {figures_root}", flush=True)
    try:
        run_summary(figures_root, sweep.summary)
    except (SummaryError, MaskMismatchError, ArtifactError) as error:
        print(f"summary step failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0
