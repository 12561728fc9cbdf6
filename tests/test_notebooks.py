"""The notebooks: paired with their jupytext twins, parameterised alike, and each one runs in `smoke`."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

from effllm import models, runner
from effllm.runner.executors import LocalExecutor

NOTEBOOKS_DIR = runner.REPO_ROOT / "notebooks"
TWINS = runner.discover_notebooks(NOTEBOOKS_DIR)  # NN_title.py
IPYNBS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def test_notebook_00_exists():
    """The quickstart is the first notebook every reader opens (issue 2)."""
    assert any(p.stem.startswith("00_") for p in TWINS), (
        f"no notebooks/00_*.py in {NOTEBOOKS_DIR}; found: {[p.name for p in TWINS]}"
    )


def test_every_notebook_has_its_twin():
    py_stems = {p.stem for p in TWINS}
    ipynb_stems = {p.stem for p in IPYNBS}
    assert py_stems == ipynb_stems, (
        f".ipynb without .py: {sorted(ipynb_stems - py_stems)}; .py without .ipynb: {sorted(py_stems - ipynb_stems)}"
        " (pair them with `jupytext --set-formats ipynb,py:percent notebooks/NN_title.ipynb`)"
    )


def cells(path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """Cell type, source and tags: what must agree between twins (outputs and other metadata may not)."""
    return [
        (cell.cell_type, cell.source.strip(), tuple(cell.metadata.get("tags", ())))
        for cell in jupytext.read(path).cells
    ]


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.stem)
def test_twins_are_in_sync(ipynb):
    twin = ipynb.with_suffix(".py")
    if not twin.exists():
        pytest.fail(f"{twin.name} is missing (see test_every_notebook_has_its_twin)")
    from_ipynb, from_py = cells(ipynb), cells(twin)
    hint = f"run `.venv/bin/jupytext --sync notebooks/{ipynb.name}` (the newer file wins)"
    assert len(from_ipynb) == len(from_py), (
        f"{ipynb.name} has {len(from_ipynb)} cells, {twin.name} has {len(from_py)}: {hint}"
    )
    for index, (a, b) in enumerate(zip(from_ipynb, from_py, strict=True)):
        assert a == b, f"cell {index} differs between {ipynb.name} and {twin.name}: {hint}\n{a}\n!=\n{b}"


PYTHON3_KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.stem)
def test_notebook_names_its_kernel_and_language(ipynb):
    """JupyterLab opens a notebook without a kernelspec with a "Select kernel" dialog, and nbconvert and
    GitHub highlight code by `language_info`; both twins carry the kernelspec so a sync keeps it."""
    metadata = nbformat.read(ipynb, as_version=4).metadata
    hint = (f"add it to {ipynb.name}'s metadata and to the header of {ipynb.stem}.py, then run "
            f"`.venv/bin/jupytext --sync notebooks/{ipynb.name}`")
    kernelspec = {k: metadata.get("kernelspec", {}).get(k) for k in PYTHON3_KERNELSPEC}
    assert kernelspec == PYTHON3_KERNELSPEC, f"{ipynb.name}: kernelspec is {kernelspec}, not {PYTHON3_KERNELSPEC}: {hint}"
    assert metadata.get("language_info", {}).get("name") == "python", (
        f"{ipynb.name}: language_info is {metadata.get('language_info')}, not {{'name': 'python', ...}}: {hint}")
    twin = jupytext.read(ipynb.with_suffix(".py")).metadata.get("kernelspec", {})
    assert {k: twin.get(k) for k in PYTHON3_KERNELSPEC} == PYTHON3_KERNELSPEC, (
        f"{ipynb.stem}.py has no python3 kernelspec in its jupytext header: {hint}")


@pytest.mark.parametrize("notebook", TWINS, ids=lambda p: p.stem)
def test_notebook_declares_the_common_parameters(notebook):
    nb = runner.read_notebook(notebook)
    assert runner.has_parameters_cell(nb), f'{notebook.name} has no `# %% tags=["parameters"]` cell'
    declared = runner.declared_parameters(notebook)
    missing = [name for name in runner.COMMON_PARAMETERS if name not in declared]
    assert not missing, f"{notebook.name} does not declare {missing} (it declares {declared})"


@pytest.mark.notebook
@pytest.mark.dtype_paths
def test_every_notebook_runs_in_smoke_profile(tmp_path):
    """Every notebook in `smoke`, two at a time (CI has 2 cores; the profile gives each kernel one thread):
    ok, its figures published, its HTML report beside them with every PNG embedded, no error output."""
    # The tiny models take the precision the embedded ones take on this machine (EFFLLM_DTYPE, else the hardware
    # rule), so the smoke run walks the default run's path; `make test` runs it again in the other precision.
    precision = str(models.default_dtype()).removeprefix("torch.")
    jobs, _ = runner.build_jobs(TWINS, "smoke", tmp_path / "build", timeout=600)
    jobs = runner.jobs.with_dtype(jobs, precision)
    assert all(job.env.get("OMP_NUM_THREADS") == "1" for job in jobs)
    results = runner.run(jobs, LocalExecutor(2))
    failed = {job.notebook.stem: f"{result.error} (executed copy: {result.executed})"
              for job, result in zip(jobs, results, strict=True) if result.status != "ok"}
    assert not failed, f"notebooks failed in smoke: {failed}"
    for job, result in zip(jobs, results, strict=True):
        notebook = job.notebook
        assert result.figures, f"{notebook.name} wrote no figure into figures_dir"
        assert all((job.publish_dir / name).is_file() for name in result.figures)
        assert job.publish_dir.is_relative_to(tmp_path)  # smoke never touches figures/
        # The HTML report: published beside the figures, every saved figure shown in it, no error output.
        assert result.report == str(job.publish_dir / "notebooks" / f"{notebook.stem}.html")
        html = Path(result.report).read_text(encoding="utf-8")
        pngs = [name for name in result.figures if name.endswith(".png")]
        shown = html.count('src="data:image/png;base64,')
        assert shown >= len(pngs) > 0, f"{notebook.stem}: {len(pngs)} PNG figures saved, {shown} embedded in the report"
        errors = [o for cell in nbformat.read(result.executed, as_version=4).cells
                  for o in cell.get("outputs", []) if o.output_type == "error"]
        assert errors == [], f"{notebook.stem}: error outputs in the executed copy: {[e.ename for e in errors]}"
    # one run, one stamp (effllm.stamps): the claims report and the README accept what it published
    from effllm.experiments.claims import check_folder_stamps

    made_from = check_folder_stamps(jobs[0].publish_dir)
    assert made_from.status == "agree" and made_from.stamp["profile"] == "smoke", made_from.line()
    quickstart = next(r.executed for job, r in zip(jobs, results, strict=True) if job.notebook.stem.startswith("00_"))
    described = nbformat.read(quickstart, as_version=4)
    assert f"torch.{precision}" in str([cell.get("outputs", []) for cell in described.cells]), (
        f"the quickstart's model facts do not say it ran in {precision}")
