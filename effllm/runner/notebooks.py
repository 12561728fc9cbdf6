"""The notebooks run_all runs: finding them, selecting them by name, and the parameters each one gets.

A notebook is ``notebooks/NN_title.py``, the jupytext py:percent twin of ``NN_title.ipynb``; its cell tagged
``parameters`` declares what it accepts, and only those names are ever passed to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from effllm.runner.profiles import PROFILES, RESERVED_PARAMETERS

if TYPE_CHECKING:
    from nbformat import NotebookNode

NOTEBOOK_PATTERN = "[0-9][0-9]_*.py"
COMMON_PARAMETERS = ("profile", "model_name", "seed", "figures_dir", "device", "dtype")
PYTHON3_KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

__all__ = ["COMMON_PARAMETERS", "NOTEBOOK_PATTERN", "PYTHON3_KERNELSPEC", "RESERVED_PARAMETERS",
           "declared_parameters", "discover_notebooks", "has_parameters_cell", "notebook_parameters",
           "read_notebook", "select_notebooks"]


def discover_notebooks(notebooks_dir: Path) -> list[Path]:
    """The py:percent twins ``NN_title.py`` in reading order."""
    return sorted(Path(notebooks_dir).glob(NOTEBOOK_PATTERN))


def read_notebook(path: Path) -> NotebookNode:
    """A notebook from its py:percent (or .ipynb) file, with a kernelspec papermill can use."""
    import jupytext

    nb = jupytext.read(path)
    # papermill needs a kernel to parse the parameters cell; a twin without a jupytext header has none.
    nb.metadata.setdefault("kernelspec", dict(PYTHON3_KERNELSPEC))
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
