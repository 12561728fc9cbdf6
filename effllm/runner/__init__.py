"""run_all.py as a package: run the notebooks with papermill, publish their figures and HTML reports.

    profiles.py   the parameter sets (profiles/smoke.yaml, default.yaml, paper.yaml) and figure folders
    notebooks.py  finding notebooks, selecting them by name, the parameters each one gets
    jobs.py       a Job, running it (`run_job`), publishing all-or-nothing, summaries
    kernels.py    a kernel with everything it started, Ctrl-C (Cancellation), the kernel manager
    reports.py    an executed notebook as a self-contained HTML page
    executors.py  where jobs run: local threads, Ray tasks, SLURM jobs (submitit)
    sweeps.py     sweep files: one notebook over a parameter grid
    cli.py        the command line (`main`), which run_all.py calls

The names below are the ones tests and notebooks use; the modules hold the rest.
"""

from effllm.runner.jobs import (
    INTERRUPTED,
    NOT_RUN,
    Cancellation,
    Job,
    JobResult,
    build_jobs,
    format_summary,
    land,
    publish,
    run,
    run_job,
    run_job_isolated,
    write_summary,
)
from effllm.runner.notebooks import (
    COMMON_PARAMETERS,
    NOTEBOOK_PATTERN,
    declared_parameters,
    discover_notebooks,
    has_parameters_cell,
    notebook_parameters,
    read_notebook,
    select_notebooks,
)
from effllm.runner.profiles import PROFILES, REPO_ROOT, RESERVED_PARAMETERS, load_profiles, publish_dir_for
from effllm.runner.reports import REPORTS_FOLDER, render_report
from effllm.runner.sweeps import Resources, Sweep, SweepError, build_sweep_jobs, load_sweep, point_slug

__all__ = [
    "COMMON_PARAMETERS", "INTERRUPTED", "NOTEBOOK_PATTERN", "NOT_RUN", "PROFILES", "REPORTS_FOLDER", "REPO_ROOT",
    "RESERVED_PARAMETERS", "Cancellation", "Job", "JobResult", "Resources", "Sweep", "SweepError",
    "build_jobs", "build_sweep_jobs", "declared_parameters", "discover_notebooks", "format_summary",
    "has_parameters_cell", "land", "load_profiles", "load_sweep", "notebook_parameters", "point_slug", "publish",
    "publish_dir_for", "read_notebook", "render_report", "run", "run_job", "run_job_isolated", "select_notebooks",
    "write_summary",
]
