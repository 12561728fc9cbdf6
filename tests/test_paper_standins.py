"""The `paper` profile end to end, offline: every notebook in the paper-standins profile (the paper profile's
models, data set names, layer indices and code paths, every hub id answered by its stand-in, smoke sizes)
runs to the end, publishes its figures and report, and has no error output."""

from __future__ import annotations

import json

import nbformat
import pytest

from effllm import runner
from effllm.runner.executors import LocalExecutor

NOTEBOOKS = runner.discover_notebooks(runner.REPO_ROOT / "notebooks")


@pytest.mark.notebook
def test_every_notebook_runs_in_the_paper_standins_profile(tmp_path, capsys):
    jobs, warnings = runner.build_jobs(NOTEBOOKS, "paper-standins", tmp_path / "build", timeout=600)
    assert warnings == []
    assert all(job.env["EFFLLM_STANDINS"] == "1" and job.env["HF_HUB_OFFLINE"] == "1" for job in jobs)
    results = runner.run(jobs, LocalExecutor(1))
    table = runner.format_summary(results)
    with capsys.disabled():  # the per-notebook seconds, for the CI log (this is CI's budget to watch)
        print(f"\npaper-standins:\n{table}")
    failed = {r.notebook: r.error for r in results if r.status != "ok"}
    assert not failed, f"paper-standins notebooks failed: {json.dumps(failed, indent=1)}"
    for job, result in zip(jobs, results, strict=True):
        assert result.figures and job.publish_dir.is_relative_to(tmp_path)  # never figures/ or figures/paper/
        executed = nbformat.read(result.executed, as_version=4)
        assert executed.metadata.papermill.parameters["model_name"] == job.parameters["model_name"]
        errors = [o.ename for cell in executed.cells for o in cell.get("outputs", []) if o.output_type == "error"]
        assert errors == [], f"{job.name}: error outputs in the executed copy: {errors}"
