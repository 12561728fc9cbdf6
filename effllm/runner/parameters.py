"""Every notebook's ``parameters`` cell holds the default profile's values, so that Run All in JupyterLab makes
the figures `make run` published (issue 25 item 7).

    python -m effllm.runner.parameters --check   # exit 1 and list every value that differs from the profile
    python -m effllm.runner.parameters --write   # rewrite those values in notebooks/NN_*.py, sync the .ipynb

For each notebook the values are the ones run_all passes it under the default profile (``common`` and the
notebook's section, resolved by :mod:`effllm.runner.profiles`, filtered by :func:`notebook_parameters` to what the
cell declares), ``figures_dir`` excepted (run_all sets it to its staging folder; the notebook's ``None`` is the
repository's figures/). ``--write`` changes only the value of each such assignment in the parameters cell of the
py:percent twin, keeping its trailing comment and every other line, then runs ``jupytext --sync`` on the twin.
An assignment whose value already equals the profile's (``4 / 24`` for 0.1666...) is left as written; a value is
written as a Python literal, floats as the YAML gives them.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effllm.runner.notebooks import discover_notebooks, notebook_parameters, select_notebooks
from effllm.runner.profiles import REPO_ROOT

SOURCE_PROFILE = "default"
PARAMETERS_HEADER = '# %% tags=["parameters"]'
CELL_MARKER = "# %%"
NOT_FROM_THE_PROFILE = ("figures_dir",)  # run_all's staging folder; the notebook's None means figures/
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
_UNKNOWN = object()  # a value that is not a literal (it never equals a profile's value)
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}


@dataclass(frozen=True)
class Assignment:
    """``name = value`` in a parameters cell: its value, and where the value's source is (0-based lines of the
    cell body, character columns)."""

    name: str
    value: Any
    first_line: int
    first_col: int
    last_line: int
    last_col: int


@dataclass(frozen=True)
class Mismatch:
    path: Path
    name: str
    found: Any  # _UNKNOWN for a value that is not a literal; None with declared=False
    wanted: Any
    declared: bool = True

    def __str__(self) -> str:
        where = _display(self.path)
        if not self.declared:
            return f"{where}: the {SOURCE_PROFILE} profile sets {self.name}, which the parameters cell does not declare"
        found = "an expression that is not a literal" if self.found is _UNKNOWN else format_literal(self.found)
        return f"{where}: {self.name} = {found}, the {SOURCE_PROFILE} profile has {format_literal(self.wanted)}"


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def literal_value(node: ast.expr) -> Any:
    """A literal's value (``ast.literal_eval``), or arithmetic on number literals (``4 / 24``); ``_UNKNOWN``
    for anything else (a name, a call)."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = literal_value(node.left), literal_value(node.right)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
        if numbers:
            try:
                return _ARITHMETIC[type(node.op)](left, right)
            except (ArithmeticError, ValueError):
                return _UNKNOWN
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [literal_value(e) for e in node.elts]
        if all(v is not _UNKNOWN for v in items):
            return items if isinstance(node, ast.List) else tuple(items)
    return _UNKNOWN


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (``True`` is not ``1``, ``1`` is not ``1.0``, a tuple is not
    a list): what papermill injects is the YAML's value, and the notebook's should be the very same."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b


def format_literal(value: Any) -> str:
    """``value`` as Python source: None, bools, numbers (``repr``: floats round-trip), strings in double quotes,
    lists and dicts of them."""
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)  # its escapes are Python's too
    elif isinstance(value, (list, tuple)):
        items = ", ".join(format_literal(v) for v in value)
        text = f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{format_literal(k)}: {format_literal(v)}" for k, v in value.items()) + "}"
    else:
        raise TypeError(f"{value!r} ({type(value).__name__}) has no Python literal; a profile value must be None, "
                        "a bool, a number, a string, or a list or mapping of them")
    try:
        survives = same_value(ast.literal_eval(text), value)
    except ValueError:  # nan, inf
        survives = False
    if not survives:
        raise ValueError(f"{value!r} does not survive as the literal {text}")
    return text


def parameters_cell(lines: Sequence[str]) -> tuple[int, int]:
    """``(first, end)``: the body of the cell tagged parameters is ``lines[first:end]`` (after its header, up
    to the next cell marker). Raises ValueError when there is none."""
    starts = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == PARAMETERS_HEADER]
    if len(starts) != 1:
        raise ValueError(f"expected one line {PARAMETERS_HEADER!r}, found {len(starts)}")
    first = starts[0] + 1
    end = next((i for i in range(first, len(lines)) if lines[i].startswith(CELL_MARKER)), len(lines))
    return first, end


def _char_col(line: str, byte_col: int) -> int:
    """ast's columns count UTF-8 bytes; a column in characters of ``line``."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8"))


def cell_assignments(source: str) -> dict[str, Assignment]:
    """The top-level ``name = value`` (and ``name: type = value``) statements of a parameters cell's source."""
    lines = source.splitlines(keepends=True)
    found: dict[str, Assignment] = {}
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        first, last = value.lineno - 1, value.end_lineno - 1
        found[target.id] = Assignment(target.id, literal_value(value), first,
                                      _char_col(lines[first], value.col_offset), last,
                                      _char_col(lines[last], value.end_col_offset))
    return found


def profile_values(stem: str, declared: Sequence[str], profile: str = SOURCE_PROFILE) -> dict[str, Any]:
    """What run_all passes notebook ``stem`` under ``profile`` (of the names it declares), less figures_dir."""
    values = notebook_parameters(profile, stem, list(declared), {}, Path())
    return {name: value for name, value in values.items() if name not in NOT_FROM_THE_PROFILE}


def _declared_everything(stem: str, profile: str) -> list[str]:
    """Every name the profile sets for ``stem`` (to find the ones a notebook does not declare)."""
    from effllm.runner.profiles import PROFILES

    table = PROFILES[profile]
    return ["profile", *table["common"], *table.get(stem, {})]


def mismatches_in(source: str, path: Path, stem: str, profile: str = SOURCE_PROFILE) -> list[Mismatch]:
    """Every value of the parameters cell ``source`` (its body) that differs from ``profile``'s, and every name
    the profile sets that the cell does not declare."""
    assignments = cell_assignments(source)
    wanted = profile_values(stem, _declared_everything(stem, profile), profile)
    found = []
    for name, value in wanted.items():
        if name not in assignments:
            found.append(Mismatch(path, name, None, value, declared=False))
        elif not same_value(assignments[name].value, value):
            found.append(Mismatch(path, name, assignments[name].value, value))
    return found


def rewrite_cell(lines: list[str], wanted: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(lines, changed names)``: the cell body ``lines`` with each assignment whose value differs from
    ``wanted``'s given that value (on one line), everything after the value (its comment) kept."""
    assignments = cell_assignments("".join(lines))
    changes = [a for name, a in assignments.items() if name in wanted and not same_value(a.value, wanted[name])]
    lines = list(lines)
    for a in sorted(changes, key=lambda a: a.first_line, reverse=True):  # bottom up: earlier lines keep their place
        head, tail = lines[a.first_line][: a.first_col], lines[a.last_line][a.last_col:]
        lines[a.first_line: a.last_line + 1] = [head + format_literal(wanted[a.name]) + tail]
    return lines, [a.name for a in sorted(changes, key=lambda a: a.first_line)]


def check_notebook(path: Path, profile: str = SOURCE_PROFILE) -> list[Mismatch]:
    """The mismatches of ``NN_title.py``'s parameters cell and of its paired ``.ipynb``'s."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    first, end = parameters_cell(lines)
    found = mismatches_in("".join(lines[first:end]), path, path.stem, profile)
    ipynb = path.with_suffix(".ipynb")
    if ipynb.exists():
        source = ipynb_parameters_source(ipynb)
        found += (mismatches_in(source, ipynb, path.stem, profile) if source is not None
                  else [Mismatch(ipynb, "(parameters cell)", None, None, declared=False)])
    return found


def ipynb_parameters_source(ipynb: Path) -> str | None:
    """The source of the cell tagged parameters in a .ipynb (None when it has none)."""
    cells = json.loads(Path(ipynb).read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = cell["source"]
            return source if isinstance(source, str) else "".join(source)
    return None


def _twins_differ(path: Path) -> bool:
    """Whether the .ipynb is newer than its .py and their inputs differ: edits made in JupyterLab and not yet
    synced, which a sync from the .py would lose."""
    import jupytext

    ipynb = path.with_suffix(".ipynb")
    if not ipynb.exists() or ipynb.stat().st_mtime <= path.stat().st_mtime:
        return False

    def inputs(p: Path) -> list[tuple[str, str]]:
        return [(c.cell_type, c.source.strip()) for c in jupytext.read(p).cells]

    return inputs(ipynb) != inputs(path)


def sync(path: Path) -> None:
    """``jupytext --sync`` on the twin: the .ipynb takes the .py's inputs and keeps its outputs."""
    from jupytext.cli import jupytext as jupytext_cli

    if jupytext_cli(["--sync", "--quiet", str(path)]):
        raise RuntimeError(f"jupytext --sync {path} failed")


def write_notebook(path: Path, profile: str = SOURCE_PROFILE) -> list[str]:
    """Give ``NN_title.py``'s parameters cell ``profile``'s values (only those lines change; the file is read
    right before it is written) and sync its .ipynb; the names changed."""
    path = Path(path)
    if _twins_differ(path):
        raise RuntimeError(f"{path.with_suffix('.ipynb').name} is newer than {path.name} and differs from it: "
                           f"run `jupytext --sync {_display(path.with_suffix('.ipynb'))}` first")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    first, end = parameters_cell(lines)
    wanted = profile_values(path.stem, list(cell_assignments("".join(lines[first:end]))), profile)
    body, changed = rewrite_cell(lines[first:end], wanted)
    if changed:
        if path.read_text(encoding="utf-8") != text:
            raise RuntimeError(f"{path} changed while it was being rewritten; run again")
        path.write_text("".join(lines[:first] + body + lines[end:]), encoding="utf-8")
    ipynb = path.with_suffix(".ipynb")
    if changed or (ipynb.exists() and ipynb_parameters_source(ipynb) != "".join(lines[first:end]).strip()):
        sync(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m effllm.runner.parameters --check | --write [NOTEBOOK ...]``: 0 consistent (or rewritten),
    1 mismatches found by --check (each listed), 2 bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m effllm.runner.parameters",
        description=f"Keep each notebook's parameters cell equal to the {SOURCE_PROFILE} profile "
                    f"(effllm/runner/profiles/{SOURCE_PROFILE}.yaml), so that Run All makes the published figures.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="list every value that differs; exit 1 if any")
    mode.add_argument("--write", action="store_true", help="rewrite the values that differ, then jupytext --sync")
    parser.add_argument("notebooks", nargs="*", help="notebook names (stem, NN or title); default: all")
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    notebooks = discover_notebooks(args.notebooks_dir)
    if args.notebooks:
        notebooks, unmatched = select_notebooks(notebooks, args.notebooks)
        if unmatched:
            print(f"no notebook named {', '.join(unmatched)}", file=sys.stderr)
            return 2
    if args.check:
        found = [m for path in notebooks for m in check_notebook(path)]
        for mismatch in found:
            print(mismatch)
        if found:
            print(f"{len(found)} value(s) differ from the {SOURCE_PROFILE} profile: "
                  "run `python -m effllm.runner.parameters --write`", file=sys.stderr)
        return 1 if found else 0
    for path in notebooks:
        changed = write_notebook(path)
        if changed:
            print(f"{_display(path)}: {', '.join(changed)}")
    left = [m for path in notebooks for m in check_notebook(path)]
    for mismatch in left:  # a name the cell does not declare: the profile or the cell needs a hand
        print(mismatch, file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
