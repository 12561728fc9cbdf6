"""Parameter sweeps: one notebook over a grid of parameters, one run per grid point.

A sweep file (YAML) names one notebook, a parameter grid and the resources each run needs:

    name: wanda_calibration_sets        # optional; default: the file's stem
    notebook: 04_domain_submodels       # stem, NN prefix or title, as for run_all.py --only
    profile: paper                      # optional; default: run_all.py --profile
    parameters: {nsamples: 128}         # optional: the same for every run
    grid:                               # every combination is one run
      calibration_set: [c4, wmt14]
      sparsity: [0.5, 0.6]
    resources: {cpus: 8, gpus: 1, memory_gb: 64, time_limit_min: 120}
    summary: {kind: mask_overlap, compare: calibration_set}   # optional: a step over all runs at the end

``grid`` may also be a list of such mappings: the runs are the union of their products (for example
unstructured sparsities in one, N:M patterns without a sparsity in another).

Each run is a `Job` (effllm.runner.jobs) with its own folders: the executed copy in
``build/<profile>/sweeps/<sweep>/<run-id>/``, its figures, its HTML report (``<notebook>.html``) and a
``parameters.json`` in ``<figures>/sweeps/<sweep>/<run-id>/``, and one summary (JSON and CSV) for the sweep.
Where the runs execute (this machine, Ray, SLURM) is up to the executor (effllm.runner.executors).
``summary`` names a sweep-level step that reads every ok run's outputs once the runs are done
(effllm.runner.summaries); its files go to ``<figures>/sweeps/<sweep>/summary/``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from effllm.paths import write_atomic
from effllm.runner.jobs import Job, JobResult, was_interrupted
from effllm.runner.notebooks import declared_parameters, notebook_parameters, select_notebooks
from effllm.runner.profiles import PROFILES, RESERVED_PARAMETERS, profile_environment, publish_dir_for
from effllm.runner.summaries import SummarySpec, parse_summary, spec_to_json
from effllm.stamps import run_environment

SWEEP_KEYS = ("name", "notebook", "profile", "parameters", "grid", "resources", "summary")
RESOURCE_KEYS = ("cpus", "gpus", "memory_gb", "time_limit_min")


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
    summary: SummarySpec | None = None  # the sweep-level step run after the runs (effllm.runner.summaries)

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
    summary = None
    if raw.get("summary") is not None:
        try:
            summary = parse_summary(raw["summary"], list(dict.fromkeys(k for block in grid for k in block)),
                                    "summary")
        except ValueError as error:
            raise _fail(path, str(error)) from None
    return Sweep(name=name, notebook=str(notebook), grid=grid, parameters=dict(parameters),
                 resources=_resources(path, raw.get("resources")), profile=profile, summary=summary)


# ---------------------------------------------------------------------------------------------------------
# Jobs and summaries


def sweep_publish_dir(sweep_name: str, profile: str, build_dir: Path, publish_dir: Path | None = None) -> Path:
    """The sweep's figure folder: <profile's figure folder>/sweeps/<sweep>/, one sub-folder per run."""
    root = Path(publish_dir).resolve() if publish_dir else publish_dir_for(profile, Path(build_dir).resolve())
    return root / "sweeps" / sweep_name


def build_sweep_jobs(
    sweep: Sweep,
    notebooks: Sequence[Path],
    profile: str,
    build_dir: Path,
    overrides: dict[str, Any] | None = None,
    publish_dir: Path | None = None,
    timeout: float | None = None,
) -> tuple[list[Job], list[dict[str, Any]]]:
    """One `Job` per grid point of `sweep`, and the grid points.

    Parameters: profile common < profile per-notebook < the sweep's `parameters` < `overrides` (-p) < the
    grid point. Executed copies go to build/<profile>/sweeps/<sweep>/<run-id>/, figures and the run's HTML
    report (``<notebook>.html``) to `sweep_publish_dir(...)/<run-id>/`. Raises `SweepError` for a notebook that matches
    nothing, or a parameter the notebook does not declare.
    """
    if profile not in PROFILES:
        raise SweepError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    overrides = overrides or {}
    selected, _ = select_notebooks(notebooks, [sweep.notebook])
    if len(selected) != 1:
        available = ", ".join(nb.stem for nb in notebooks) or "none"
        raise SweepError(f"sweep {sweep.name!r}: notebook {sweep.notebook!r} matches "
                         f"{len(selected)} notebooks; notebooks: {available} (give a stem, NN prefix or title)")
    notebook = Path(selected[0]).resolve()
    declared = declared_parameters(notebook)
    points, run_ids = sweep.points(), sweep.run_ids()
    swept = {key for point in points for key in point}
    undeclared = sorted((swept | set(sweep.parameters) | set(overrides)) - set(declared))
    if undeclared:
        raise SweepError(f"sweep {sweep.name!r}: {notebook.stem} does not declare {undeclared}; "
                         f"it declares: {', '.join(declared)}")
    clash = sorted(swept & set(overrides))
    if clash:
        raise SweepError(f"sweep {sweep.name!r}: -p {', '.join(clash)} would override the swept value(s); "
                         "change the sweep file's grid instead")
    build_dir = Path(build_dir).resolve()
    runs_dir = build_dir / profile / "sweeps" / sweep.name
    figures_root = sweep_publish_dir(sweep.name, profile, build_dir, publish_dir)
    jobs = []
    stamped = run_environment(profile)  # the profile, commit and dirty flag the runs' artefacts are stamped with
    for run_id, point in zip(run_ids, points, strict=True):
        staging = runs_dir / run_id / "staging"
        wanted = {**sweep.parameters, **overrides, **point}
        jobs.append(Job(
            notebook=notebook,
            parameters=notebook_parameters(profile, notebook.stem, declared, wanted, staging),
            output_path=runs_dir / run_id / f"{notebook.stem}.ipynb",
            staging_dir=staging,
            publish_dir=figures_root / run_id,
            timeout=timeout,
            # the profile's `environment`, then what run_all itself sets
            env={**profile_environment(profile), **stamped, "EFFLLM_FIGURES": str(staging)},
            time_limit=sweep.resources.time_limit_s,
            run_id=run_id,
            report_path=figures_root / run_id / f"{notebook.stem}.html",
        ))
    return jobs, points


def write_sweep_summary(
    folder: Path,
    sweep: Sweep,
    profile: str,
    executor: str,
    jobs: Sequence[Job],
    points: Sequence[dict[str, Any]],
    results: Sequence[JobResult],
) -> tuple[Path, Path]:
    """summary.json and summary.csv in the sweep's figure folder (one row per run: run id, the swept
    parameters, status, seconds, figures and report relative to the folder, error), and parameters.json in the folder
    of every run that succeeded, so a figure's own folder says what produced it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for job, point, r in zip(jobs, points, results, strict=True):
        passed = {k: v for k, v in job.parameters.items() if k != "figures_dir"}
        rows.append({
            "run_id": job.run_id, "parameters": point, "all_parameters": passed, "status": r.status,
            "seconds": r.seconds, "figures": [f"{job.run_id}/{f}" for f in r.figures], "error": r.error,
            "executed": r.executed, "report": f"{job.run_id}/{Path(r.report).name}" if r.report else None,
        })
        if r.status == "ok":
            record = {"sweep": sweep.name, "run_id": job.run_id, "notebook": job.notebook.stem,
                      "profile": profile, "parameters": passed, "swept": point, "executed": r.executed}
            write_atomic(job.publish_dir / "parameters.json", (json.dumps(record, indent=2) + "\n").encode())
    payload = {
        "sweep": sweep.name, "notebook": jobs[0].notebook.stem if jobs else sweep.notebook,
        "profile": profile, "executor": executor, "resources": asdict(sweep.resources),
        "figures_dir": str(folder), "ok": all(r.status == "ok" for r in results),
        "interrupted": was_interrupted(results), "runs": rows,
        "summary_step": spec_to_json(sweep.summary) if sweep.summary else None,
    }
    json_path, csv_path = folder / "summary.json", folder / "summary.csv"
    write_atomic(json_path, (json.dumps(payload, indent=2) + "\n").encode())
    keys = list(dict.fromkeys(k for point in points for k in point))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["run_id", *keys, "status", "seconds", "figures", "error"])
    for row in rows:
        values = [json.dumps(row["parameters"][k]) if isinstance(row["parameters"].get(k), list | dict)
                  else row["parameters"].get(k, "") for k in keys]
        writer.writerow([row["run_id"], *values, row["status"], row["seconds"], " ".join(row["figures"]),
                         row["error"] or ""])
    write_atomic(csv_path, text.getvalue().encode())
    return json_path, csv_path
