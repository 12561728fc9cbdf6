"""Sweeps: the sweep file, its runs' parameters and folders, and the same small sweep on a local Ray
(2 workers) and through submitit's local cluster: every run's parameters arrive, its figures come back
into the layout, and a failing run is reported with the others intact."""

from __future__ import annotations

import csv
import importlib.util
import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from effllm import runner
from effllm.runner import cli
from effllm.runner.sweeps import Resources, SweepError, load_sweep, point_slug

# Draws a figure through effllm.plots.save_figure and records what it received; fails for pattern "broken".
SWEPT = """\
# %% tags=["parameters"]
profile = "unset"
model_name = "unset"
seed = -1
figures_dir = "unset"
sparsity = 0.0
pattern = "unset"
n_samples = 1
hold_s = 0.0

# %%
import json, os, pathlib, time
import matplotlib.pyplot as plt
import pandas as pd
from effllm.plots import save_figure
start = time.time()
if pattern == "broken":
    raise ValueError(f"deliberate failure for pattern={pattern}")
time.sleep(hold_s)
table = pd.DataFrame({"sparsity": [sparsity], "pattern": [pattern], "n_samples": [n_samples]})
fig, ax = plt.subplots()
ax.bar([pattern], [sparsity])
save_figure(fig, "bars", table=table, out_dir=figures_dir)
received = dict(profile=profile, model_name=model_name, seed=seed, sparsity=sparsity, pattern=pattern,
                n_samples=n_samples, pid=os.getpid(), start=start, end=time.time())
(pathlib.Path(figures_dir) / "received.json").write_text(json.dumps(received))
"""

SWEEP = """\
name: tiny
notebook: 00_swept
profile: smoke
parameters: {n_samples: 4}
grid:
  - pattern: [unstructured]
    sparsity: [0.5, 0.6]
  - pattern: [broken]
    sparsity: [0.5]
resources: {cpus: 1, gpus: 0, time_limit_min: 5}
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def sweep_setup(tmp_path):
    notebooks = tmp_path / "nb"
    write(notebooks, "00_swept.py", SWEPT)
    sweep_file = write(tmp_path, "tiny.yaml", SWEEP)
    return tmp_path, notebooks, sweep_file


def run_sweep(root: Path, notebooks: Path, sweep_file: Path, *extra: str) -> tuple[int, Path, Path]:
    build = root / "build"
    code = cli.main(["--sweep", str(sweep_file), "--notebooks-dir", str(notebooks), "--build-dir", str(build),
                         *extra])
    return code, build, build / "smoke" / "figures" / "sweeps" / "tiny"


def check_sweep_outcome(code: int, build: Path, figures: Path) -> dict:
    """The properties every executor must give: parameters arrive, figures land per run, one run fails."""
    assert code == 1  # one run failed
    summary = json.loads((figures / "summary.json").read_text())
    runs = {r["run_id"]: r for r in summary["runs"]}
    assert list(runs) == ["000-pattern=unstructured_sparsity=0.5", "001-pattern=unstructured_sparsity=0.6",
                          "002-pattern=broken_sparsity=0.5"]
    ok = [r for r in runs.values() if r["status"] == "ok"]
    (failed,) = [r for r in runs.values() if r["status"] == "failed"]
    assert failed["run_id"].startswith("002") and "deliberate failure for pattern=broken" in failed["error"]
    assert failed["figures"] == [] and failed["report"] is None and not (figures / failed["run_id"]).exists()
    assert len(ok) == 2
    for run in ok:
        folder = figures / run["run_id"]
        assert sorted(run["figures"]) == sorted(f"{run['run_id']}/{name}" for name in
                                                ("bars.csv", "bars.pdf", "bars.png", "bars.stamp.json", "received.json"))
        assert all((figures / f).is_file() for f in run["figures"])
        received = json.loads((folder / "received.json").read_text())
        assert {k: received[k] for k in ("sparsity", "pattern")} == run["parameters"]
        assert (received["profile"], received["model_name"], received["seed"], received["n_samples"]) == (
            "smoke", "tiny-llama", 0, 4)
        recorded = json.loads((folder / "parameters.json").read_text())
        assert recorded["swept"] == run["parameters"] and recorded["parameters"]["n_samples"] == 4
        executed = build / "smoke" / "sweeps" / "tiny" / run["run_id"] / "00_swept.ipynb"
        assert Path(run["executed"]) == executed and executed.is_file()
        table = (folder / "bars.csv").read_text()
        assert str(run["parameters"]["sparsity"]) in table and run["parameters"]["pattern"] in table
        # the run's HTML report beside its figures (on Ray and SLURM shipped back from the worker)
        assert run["report"] == f"{run['run_id']}/00_swept.html"
        assert 'src="data:image/png;base64,' in (folder / "00_swept.html").read_text(encoding="utf-8")
    with open(figures / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["run_id"], r["pattern"], r["sparsity"], r["status"]) for r in rows] == [
        (run_id, r["parameters"]["pattern"], str(r["parameters"]["sparsity"]), r["status"])
        for run_id, r in runs.items()]
    return runs


# ---------------------------------------------------------------------------------------------------------
# The sweep file


def test_points_are_the_union_of_products(tmp_path):
    sweep = load_sweep(write(tmp_path, "s.yaml", SWEEP))
    assert sweep.name == "tiny" and sweep.profile == "smoke" and sweep.parameters == {"n_samples": 4}
    assert sweep.points() == [{"pattern": "unstructured", "sparsity": 0.5}, {"pattern": "unstructured", "sparsity": 0.6},
                              {"pattern": "broken", "sparsity": 0.5}]
    assert sweep.resources == Resources(cpus=1, gpus=0, memory_gb=None, time_limit_min=5)
    assert len(set(sweep.run_ids())) == 3


def test_example_sweep_file_parses():
    sweep = load_sweep(runner.REPO_ROOT / "sweeps" / "wanda_calibration_sets.yaml")
    assert sweep.name == "wanda_calibration_sets"
    (key,) = {k for p in sweep.points() for k in p if "calibration" in k}
    sets = {json.dumps(p[key]) for p in sweep.points()}
    # the 13 calibration sets named in seed 002's results table (4 domains x 3, plus c4)
    assert len(sets) == 13 and len(set(sweep.run_ids())) == len(sweep.points()) == 13 * 4
    assert sweep.resources.gpus >= 1 and sweep.resources.time_limit_min > 0


def test_slug_is_a_safe_folder_name():
    assert point_slug({"pattern": "2:4", "sets": ["c4", "wmt14"], "path": "a/b c"}) == \
        "pattern=2-4_sets=c4+wmt14_path=a-b-c"


@pytest.mark.parametrize(("text", "expected"), [
    ("notebook: 00\n", "missing 'grid'"),
    ("notebook: 00\ngrid: {sparsity: 0.5}\n", "grid.sparsity must be a non-empty list"),
    ("notebook: 00\ngrid: {figures_dir: [a]}\n", "'figures_dir' is set by run_all.py"),
    ("notebook: 00\ngrid: {a: [1]}\nresources: {gpu: 1}\n", "allowed: cpus, gpus, memory_gb, time_limit_min"),
    ("notebook: 00\ngrid: {a: [1]}\nresources: {cpus: 0}\n", "resources.cpus must be a whole number >= 1"),
    ("notebook: 00\ngrid: {a: [1]}\nparameters: {a: 2}\n", "both under 'parameters' and in 'grid'"),
    ("notebook: 00\ngrid: {a: [1]}\nschedule: x\n", "unknown key(s) ['schedule']"),
    ("notebook: 00\ngrid: [a, b\n", "not valid YAML"),
])
def test_bad_sweep_files_say_what_is_allowed(tmp_path, text, expected):
    with pytest.raises(SweepError) as error:
        load_sweep(write(tmp_path, "bad.yaml", text))
    assert expected in str(error.value) and "bad.yaml" in str(error.value)


def test_sweep_jobs_parameters_and_folders(sweep_setup):
    root, notebooks, sweep_file = sweep_setup
    sweep = load_sweep(sweep_file)
    jobs, points = runner.build_sweep_jobs(sweep, runner.discover_notebooks(notebooks), "smoke", root / "build",
                                            overrides={"hold_s": 0.5})
    assert [j.run_id for j in jobs] == sweep.run_ids()
    for job, point in zip(jobs, points, strict=True):
        assert job.parameters == {"profile": "smoke", "model_name": "tiny-llama", "seed": 0, "n_samples": 4,
                                  "hold_s": 0.5, **point, "figures_dir": str(job.staging_dir)}
        assert job.output_path == root / "build" / "smoke" / "sweeps" / "tiny" / job.run_id / "00_swept.ipynb"
        assert job.publish_dir == root / "build" / "smoke" / "figures" / "sweeps" / "tiny" / job.run_id
        assert job.time_limit == 300 and job.name == job.run_id


def test_sweep_bad_input_exits_2(sweep_setup, capsys):
    root, notebooks, _ = sweep_setup
    undeclared = write(root, "u.yaml", "notebook: 00_swept\ngrid: {sparsty: [0.1]}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--sweep", str(undeclared), "--notebooks-dir", str(notebooks), "--build-dir", str(root / "b")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "sparsty" in err and "sparsity" in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--sweep", str(undeclared), "--notebooks-dir", str(notebooks), "--executor", "local",
                      "--address", "ray://x:1"])
    assert exit_info.value.code == 2 and "--address is for --executor ray" in capsys.readouterr().err


def test_sweep_on_the_local_executor(sweep_setup, capsys):
    root, notebooks, sweep_file = sweep_setup
    code, build, figures = run_sweep(root, notebooks, sweep_file, "--jobs", "2")
    check_sweep_outcome(code, build, figures)
    out = capsys.readouterr().out
    assert "002-pattern=broken_sparsity=0.5 failed" in out and "2 ok, 1 failed" in out


def test_time_limit_stops_the_kernel(tmp_path):
    notebooks = write(tmp_path / "nb", "00_slow.py", SWEPT.replace("hold_s = 0.0", "hold_s = 60.0"))
    (job,), _ = runner.build_jobs(runner.discover_notebooks(tmp_path / "nb"), "smoke", tmp_path / "build")
    job = replace(job, time_limit=8.0)
    result = runner.run_job(job)
    assert notebooks.exists() and result.status == "failed"
    assert "time limit of 8 s exceeded" in result.error and result.seconds < 40


# ---------------------------------------------------------------------------------------------------------
# Ray and submitit

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install -e '.[scale]')")
needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="submitit is not installed (pip install -e '.[scale]')")


@needs_ray
def test_sweep_on_a_local_ray_with_two_workers(sweep_setup, capsys):
    root, notebooks, sweep_file = sweep_setup
    code, build, figures = run_sweep(root, notebooks, sweep_file, "--executor", "ray", "--jobs", "2",
                                     "-p", "hold_s=3.0")
    runs = check_sweep_outcome(code, build, figures)
    received = [json.loads((figures / r / "received.json").read_text()) for r in runs if not r.startswith("002")]
    a, b = received
    assert a["start"] < b["end"] and b["start"] < a["end"], "the two Ray workers did not run at once"
    assert "[3/3]" in capsys.readouterr().out


@needs_ray
def test_ray_refuses_a_run_no_node_can_hold():
    """Ray queues an infeasible task forever; the executor checks the nodes first (here a fake cluster)."""
    from effllm.runner.executors import RayExecutor

    class FakeRay:
        @staticmethod
        def nodes():
            return [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0, "memory": 64 * 2**30}},
                    {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 512 * 2**30}}]

    executor = RayExecutor.__new__(RayExecutor)
    executor._ray = FakeRay()
    executor._check_feasible(Resources(cpus=16, gpus=1, memory_gb=64))  # fits the live node exactly
    for too_big in (Resources(cpus=17), Resources(gpus=2), Resources(cpus=1, memory_gb=65)):
        with pytest.raises(SweepError, match="no Ray node can hold one run") as error:
            executor._check_feasible(too_big)
        assert "'CPU': 16.0" in str(error.value) and "--address" in str(error.value)


@needs_submitit
def test_sweep_through_submitit_local_cluster(sweep_setup, capsys):
    root, notebooks, sweep_file = sweep_setup
    code, build, figures = run_sweep(root, notebooks, sweep_file, "--executor", "slurm", "--slurm-cluster", "local",
                                     "--jobs", "2")
    check_sweep_outcome(code, build, figures)
    assert list((build / "smoke" / "sweeps" / "tiny" / "submitit").iterdir()), "submitit kept no job folders"
    assert "2 ok, 1 failed" in capsys.readouterr().out


def test_slurm_without_sbatch_is_a_clear_error(sweep_setup, capsys, monkeypatch):
    root, notebooks, sweep_file = sweep_setup
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--sweep", str(sweep_file), "--notebooks-dir", str(notebooks), "--executor", "slurm"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "sbatch not found" in err and "--slurm-cluster local" in err
