"""The notebook a reader opens is the one that made the figures (issue 25 item 7): every notebook's parameters
cell, in both twins, holds the default profile's values (what `make run` passes it), and every .ipynb opens on
the Python 3 kernel. `python -m effllm.runner.parameters --write` repairs the first.

That the smoke, paper and paper-standins profiles set only parameters a notebook declares is
tests/test_profiles.py's test_profile_names_existing_notebooks_and_declared_parameters (every profile)."""

from __future__ import annotations

import ast
import json
import shutil

import pytest

from effllm.runner import REPO_ROOT, discover_notebooks
from effllm.runner import parameters as P
from effllm.runner.notebooks import PYTHON3_KERNELSPEC
from effllm.runner.profiles import PROFILES

NOTEBOOKS = discover_notebooks(REPO_ROOT / "notebooks")
FIX = "run `.venv/bin/python -m effllm.runner.parameters --write`"


def _cell_values(source: str) -> dict[str, object]:
    """``name -> value`` of a parameters cell, parsed here with ast alone (literals, and arithmetic on numbers
    such as 03's ``4 / 24``)."""
    values = {}
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
            node = statement.value
            try:
                values[statement.targets[0].id] = ast.literal_eval(node)
            except ValueError:
                values[statement.targets[0].id] = eval(compile(ast.Expression(node), "<cell>", "eval"), {"__builtins__": {}})
    return values


def _py_cell(path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    first, end = P.parameters_cell(lines)
    return "".join(lines[first:end])


def test_there_are_notebooks():
    assert len(NOTEBOOKS) == 9, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_holds_the_default_profile(notebook):
    ipynb = notebook.with_suffix(".ipynb")
    for path, source in ((notebook, _py_cell(notebook)), (ipynb, P.ipynb_parameters_source(ipynb))):
        assert source is not None, f"{ipynb.name} has no cell tagged parameters"
        values = _cell_values(source)
        wanted = P.profile_values(notebook.stem, list(values))
        assert wanted["profile"] == "default" and "figures_dir" not in wanted
        differ = {name: (values[name], value) for name, value in wanted.items()
                  if not P.same_value(values[name], value)}
        assert not differ, f"{path.name}: (notebook, default profile) {differ}: {FIX}"
    assert P.check_notebook(notebook) == []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_on_the_python3_kernel(notebook):
    """JupyterLab asks for a kernel when the .ipynb names none it knows; the .py header carries the same
    kernelspec, so that `jupytext --sync` keeps it."""
    import jupytext

    expected = {"display_name": "Python 3", "language": "python", "name": "python3"}
    assert expected == PYTHON3_KERNELSPEC
    metadata = json.loads(notebook.with_suffix(".ipynb").read_text(encoding="utf-8"))["metadata"]
    assert metadata.get("kernelspec") == expected, f"{notebook.stem}.ipynb: {metadata.get('kernelspec')}"
    assert jupytext.read(notebook).metadata.get("kernelspec") == expected, f"{notebook.name}'s header"


# ---------------------------------------------------------------------------------------------------------
# the tool


CELL = '''profile = "default"  # smoke | default (set by run_all.py)
budgets = [4 / 24, 1.0]  # fractions · of the depth
n_prompts: int = 4  # prompts — per set
model_names = ["a",
               "b"]  # the models
flag = 1
# a comment line stays
untouched = "x"
'''


def test_rewrite_changes_only_the_values_that_differ_and_keeps_comments():
    wanted = {"profile": "default", "budgets": [1 / 6, 1.0], "n_prompts": 8, "model_names": ["c"],
              "flag": True, "missing": 3}
    lines, changed = P.rewrite_cell(CELL.splitlines(keepends=True), wanted)
    assert changed == ["n_prompts", "model_names", "flag"]  # budgets: 4 / 24 == 1 / 6, kept as written
    assert "".join(lines) == '''profile = "default"  # smoke | default (set by run_all.py)
budgets = [4 / 24, 1.0]  # fractions · of the depth
n_prompts: int = 8  # prompts — per set
model_names = ["c"]  # the models
flag = True
# a comment line stays
untouched = "x"
'''
    assert P.rewrite_cell(lines, wanted)[1] == []


@pytest.mark.parametrize("value", [None, True, 0, -3, 0.1, 1 / 3, 1e-05, "it's \"q\"", [], [1, [2.5, None]],
                                   {}, {"model": [1, 16], "x": {"y": "z"}}])
def test_values_are_written_as_python_literals(value):
    text = P.format_literal(value)
    assert P.same_value(ast.literal_eval(text), value)
    assert '"' in text or not isinstance(value, str)


def test_same_value_tells_types_apart():
    assert not P.same_value(1, True) and not P.same_value(1, 1.0) and not P.same_value((1,), [1])
    assert P.same_value({"a": [1, 2.0]}, {"a": [1, 2.0]}) and not P.same_value([1, 2], [1, 2, 3])


def test_check_lists_every_mismatch_and_write_fixes_both_twins(tmp_path, capsys):
    source = REPO_ROOT / "notebooks" / "01_early_exit.py"
    for suffix in (".py", ".ipynb"):
        shutil.copy(source.with_suffix(suffix), tmp_path / source.with_suffix(suffix).name)
    copy = tmp_path / source.name
    text = copy.read_text(encoding="utf-8")
    original = text
    section = PROFILES["default"]["01_early_exit"]
    n, tokens = section["n_prompts"], section["max_new_tokens"]
    for old, new in ((f"\nn_prompts = {n} ", f"\nn_prompts = {n + 1} "),
                     (f"\nmax_new_tokens = {tokens} ", f"\nmax_new_tokens = {tokens + 1} ")):
        assert text.count(old) == 1
        text = text.replace(old, new)
    copy.write_text(text, encoding="utf-8")
    args = ["--notebooks-dir", str(tmp_path)]
    assert P.main(["--check", *args]) == 1
    out = capsys.readouterr().out
    assert f"01_early_exit.py: n_prompts = {n + 1}, the default profile has {n}" in out
    assert f"01_early_exit.py: max_new_tokens = {tokens + 1}, the default profile has {tokens}" in out
    assert "01_early_exit.ipynb" not in out  # the .ipynb still holds the profile's values
    assert P.main(["--write", *args]) == 0
    assert copy.read_text(encoding="utf-8") == original  # only the two values changed back
    assert P.main(["--check", *args]) == 0
    ipynb = json.loads(copy.with_suffix(".ipynb").read_text(encoding="utf-8"))
    assert ipynb["metadata"]["kernelspec"] == PYTHON3_KERNELSPEC


def test_check_reports_an_ipynb_left_behind(tmp_path, capsys):
    source = REPO_ROOT / "notebooks" / "05_sparse_speedup.ipynb"
    shutil.copy(source.with_suffix(".py"), tmp_path)
    notebook = json.loads(source.read_text(encoding="utf-8"))
    cell = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    text = "".join(cell["source"])
    assert text.count("\nrounds = 5 ") == 1
    cell["source"] = text.replace("\nrounds = 5 ", "\nrounds = 2 ")
    (tmp_path / source.name).write_text(json.dumps(notebook), encoding="utf-8")
    assert P.main(["--check", "--notebooks-dir", str(tmp_path)]) == 1
    assert "05_sparse_speedup.ipynb: rounds = 2, the default profile has 5" in capsys.readouterr().out
