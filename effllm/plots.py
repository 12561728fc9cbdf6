"""One figure style, and saving figures with the table they were drawn from.

    fig, ax = new_figure()
    sns.lineplot(data=table, x="sparsity", y="perplexity", ax=ax)
    caption(ax, model="SmolLM2-135M", data="pydoc topics, 64 x 512 tokens")
    save_figure(fig, "04_wanda_perplexity", table=table)   # figures/04_wanda_perplexity.{pdf,png,csv}

Every file is written to a temporary name in its folder and renamed into place, so a figure folder
never holds a half-written file under a final name. Beside the files of one name goes their stamp,
``<name>.stamp.json`` (:mod:`effllm.stamps`: the commit, profile, dtype and machine of the run that wrote them),
renamed into place last; the claims report and the README refuse artefacts whose stamps differ.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text

from effllm import paths, pruning, stamps

PNG_DPI = 150
STYLE_RC: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": PNG_DPI,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,  # TrueType: text stays editable and searchable in the PDF
    "ps.fonttype": 42,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 11,
}
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_EXTENSIONS = (".pdf", ".png", ".csv", ".html", ".svg")

_figures_dir: Path | None = None


def set_style() -> None:
    """The project's figure style: seaborn whitegrid, paper context, colour-blind palette. Idempotent."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", rc=STYLE_RC)


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` in the project style, constrained layout, about 4.5 x 3.2 inches a panel."""
    set_style()
    kwargs.setdefault("figsize", (4.5 * ncols, 3.2 * nrows))
    kwargs.setdefault("layout", "constrained")
    return plt.subplots(nrows, ncols, **kwargs)


def provenance(model: str | None = None, data: str | None = None, extra: str | None = None) -> str:
    """ "model: M · data: D · extra": what was measured on what, for a title or a footnote."""
    parts = []
    if model:
        parts.append(f"model: {model}")
    if data:
        parts.append(f"data: {data}")
    if extra:
        parts.append(str(extra))
    if not parts:
        raise ValueError("provenance needs at least one of model, data or extra.")
    return " · ".join(parts)


def caption(
    target: Axes | Figure,
    model: str | None = None,
    data: str | None = None,
    extra: str | None = None,
) -> Text:
    """Put the provenance line on a plot: under an Axes' title, or as a footnote under a Figure."""
    line = provenance(model, data, extra)
    if isinstance(target, Axes):
        title = target.get_title()
        return target.set_title(f"{title}\n{line}" if title else line)
    if isinstance(target, Figure):
        # Below the figure area; bbox="tight" (saving and the inline backend) extends to include it.
        return target.text(0.01, 0.0, line, ha="left", va="top", fontsize="small", color="0.3")
    raise TypeError(f"caption takes a matplotlib Axes or Figure; got {type(target).__name__}.")


# --------------------------------------------------------------------------------------------------
# One colour per method, in every figure

# Method families (the ``method`` column of experiment tables, plus model-level methods) -> colour. Taken from
# seaborn's colour-blind palette so that figures stay readable in grey and for colour-blind readers.
_CB = ["#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9"]
METHOD_COLOURS: dict[str, str] = {
    "hf": "#000000", "full": "#4d4d4d", "dense": "#4d4d4d",
    "static": _CB[7], "calm": _CB[0], "free": _CB[1], "self-spec": _CB[2], "skip": _CB[4], "early-exit": _CB[5],
    "controller": _CB[9], "random": _CB[6],
    "wanda": _CB[3], "magnitude": _CB[8], "sparsegpt": _CB[6],
    "slicegpt": _CB[9], "constant": _CB[9], "dynamic": _CB[2], "shortgpt": _CB[5],
    "vocab": _CB[0], "combination": "#7f3c8d",
    # calibration domains of the domain sub-models (notebook 04): each domain one colour in every figure
    "code": _CB[0], "prose": _CB[1], "math": _CB[2], "self-generated": _CB[4], "commonsense": _CB[9],
    "translation": _CB[5], "web text": _CB[7],
}


def colour(method: str) -> str:
    """The colour of a method family in every figure (``"calm"``, ``"free"``, ``"wanda"``, ...); a label such as
    ``"calm-softmax 0.9"`` or ``"FREE + rollback"`` takes the colour of the family it starts with."""
    key = str(method).lower()
    if key in METHOD_COLOURS:
        return METHOD_COLOURS[key]
    for name in sorted(METHOD_COLOURS, key=len, reverse=True):
        if key.startswith(name):
            return METHOD_COLOURS[name]
    raise ValueError(f"no colour for method {method!r}; known families: {', '.join(METHOD_COLOURS)}")


def layer_axis(ax: Axes, axis: str = "x", label: str = "layer (1-based)") -> None:
    """A layer axis: whole-number ticks only (a layer 12.5 does not exist) and a label that says the numbering."""
    from matplotlib.ticker import MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(integer=True))
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label)


def speed_quality(ax: Axes, summary: pd.DataFrame, x: str = "speedup_vs_hf", y: str = "rougeL_vs_full",
                  labels: bool = True) -> None:
    """One speed-quality panel from a :func:`effllm.experiments.runs.run_policies` summary: per method family a
    line through its settings (ordered by speed), x error bars the 95% bootstrap interval over prompts of the paired
    speed ratio, y error bars the 95% interval over prompts, every point named (:func:`label_points`); HF
    ``generate`` (x = 1) is the dotted line. Settings that were not timed (no ``x``) are left out."""
    shown = summary[(summary.method != "hf") & summary[x].notna()]
    for method, rows in shown.groupby("method", sort=False):
        rows = rows.sort_values(x)
        ax.errorbar(rows[x], rows[y], xerr=[rows[x] - rows[f"{x}_ci_low"], rows[f"{x}_ci_high"] - rows[x]],
                    yerr=[rows[y] - rows[f"{y}_ci_low"], rows[f"{y}_ci_high"] - rows[y]],
                    color=colour(method), marker="o", capsize=2, lw=0.8, label=method,
                    ls="-" if len(rows) > 1 else "none")
    if labels:
        label_points(ax, shown[x], shown[y], shown.label)
    ax.axvline(1.0, color="0.6", ls=":", lw=1)


def label_points(ax: Axes, xs: Any, ys: Any, labels: Any, fontsize: float = 6) -> list[Text]:
    """Name every point of a scatter without overprinting: the labels are moved apart (and tied to their points
    with a thin line where they moved) by adjustText, which is what it is for."""
    from adjustText import adjust_text

    texts = [ax.text(x, y, str(label), fontsize=fontsize) for x, y, label in zip(xs, ys, labels, strict=True)
             if pd.notna(x) and pd.notna(y)]
    if texts:
        adjust_text(texts, ax=ax, arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5}, expand=(1.2, 1.4))
    return texts


def token_html(tokens: list[str], values: list[int], vmax: int, title: str, value_name: str = "layer") -> str:
    """One generation as HTML: each token's background shows its ``values`` (e.g. exit layers 1..vmax, viridis:
    dark early, yellow late); hover a token for its value."""
    import html as html_lib

    import matplotlib as mpl

    colormap = mpl.colormaps["viridis"]
    spans = "".join(
        f'<span title="{value_name} {v}" style="background:{mpl.colors.to_hex(colormap((v - 1) / max(vmax - 1, 1)))};'
        f'color:{"black" if v > vmax * 0.6 else "white"};padding:1px 0">{html_lib.escape(t)}</span>'
        for t, v in zip(tokens, values, strict=True))
    return (f"<div style='font-family:monospace;white-space:pre-wrap;line-height:1.6'><p><b>{html_lib.escape(title)}</b>: "
            f"background = {value_name} (dark: early, yellow: {vmax}); hover for the {value_name}.</p>{spans}</div>")


# --------------------------------------------------------------------------------------------------
# Saving


def set_figures_dir(path: str | Path | None) -> None:
    """Default folder of :func:`save_figure` (notebooks pass their ``figures_dir`` parameter).

    ``None`` goes back to :func:`effllm.paths.figures_dir` ($EFFLLM_FIGURES or ``figures/``).
    """
    global _figures_dir
    _figures_dir = None if path is None or str(path) == "" else Path(path).expanduser()


def current_figures_dir() -> Path:
    """Where :func:`save_figure` writes when no ``out_dir`` is given."""
    return _figures_dir if _figures_dir is not None else paths.figures_dir()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"Figure name {name!r} is not a plain file stem: use letters, digits, '_', '-' and '.', "
            "not starting with '.' or '-' (no folders, no spaces), e.g. '04_wanda_perplexity'. "
            "Choose the folder with out_dir or set_figures_dir."
        )
    if name.lower().endswith(_EXTENSIONS):
        raise ValueError(
            f"Figure name {name!r} ends in a file extension: give the stem, e.g. {Path(name).stem!r}."
        )


def _out_dir(out_dir: str | Path | None) -> Path:
    folder = Path(out_dir).expanduser() if out_dir is not None else current_figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_all(targets: dict[str, tuple[Path, Callable[[Path], None]]]) -> dict[str, Path]:
    """Write every target to a temporary file next to it, then rename them all into place.

    If a write fails, the temporary files are removed and no final name is touched.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for final, write in targets.values():
            temporary = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
            staged.append((temporary, final))
            write(temporary)
        for temporary, final in staged:
            os.replace(temporary, final)
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    return {key: final for key, (final, _) in targets.items()}


def _write_stamped(folder: Path, name: str, targets: dict[str, tuple[Path, Callable[[Path], None]]]
                   ) -> dict[str, Path]:
    """:func:`_write_all` of ``targets`` and, renamed last, their stamp ``<name>.stamp.json`` (listing them).
    Returns the artefacts' paths (not the sidecar's). A sidecar of this run for other files of the name (a
    ``save_html`` beside a ``save_figure`` of one name) keeps listing them; one of another run is replaced, so
    that its files count as unstamped."""
    stamp = stamps.run_stamp()
    files = {final.name for final, _ in targets.values()}
    earlier = stamps.read_stamp(stamps.stamp_path(folder, name))
    if earlier is not None and all(earlier.get(k) == stamp.get(k) for k in stamps.COMPARED):
        files |= {f for f in earlier.get("files", []) if isinstance(f, str) and (folder / f).is_file()}
    stamp["files"] = sorted(files)
    data = stamps.stamp_bytes(stamp)
    written = _write_all({**targets, "stamp": (stamps.stamp_path(folder, name), lambda path: path.write_bytes(data))})
    written.pop("stamp")
    return written


def save_figure(
    fig: Figure,
    name: str,
    table: pd.DataFrame | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write ``<dir>/<name>.pdf`` and ``.png`` (150 dpi), and ``.csv`` of ``table`` when given, with their stamp
    ``<name>.stamp.json`` (:mod:`effllm.stamps`).

    ``dir`` is ``out_dir``, else the folder of :func:`set_figures_dir`, else ``paths.figures_dir()``.
    Returns ``{"pdf": path, "png": path[, "csv": path]}``.
    """
    _check_name(name)
    if table is not None and not isinstance(table, pd.DataFrame):
        raise TypeError(
            f"table must be a pandas DataFrame (the tidy data behind the figure); got {type(table).__name__}."
        )
    folder = _out_dir(out_dir)
    targets: dict[str, tuple[Path, Callable[[Path], None]]] = {
        # No creation date in the PDF: regenerating a figure gives the same bytes.
        "pdf": (
            folder / f"{name}.pdf",
            lambda path: fig.savefig(
                path, format="pdf", bbox_inches="tight", metadata={"CreationDate": None}
            ),
        ),
        "png": (
            folder / f"{name}.png",
            lambda path: fig.savefig(path, format="png", dpi=PNG_DPI, bbox_inches="tight"),
        ),
    }
    if table is not None:
        targets["csv"] = (folder / f"{name}.csv", lambda path: table.to_csv(path, index=False))
    return _write_stamped(folder, name, targets)


def save_table(table: pd.DataFrame, name: str, out_dir: str | Path | None = None) -> Path:
    """Write a tidy table that no single figure draws (per-item data behind a claim) to ``<dir>/<name>.csv``,
    atomically, in the folder :func:`save_figure` uses, with its stamp ``<name>.stamp.json``."""
    _check_name(name)
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame; got {type(table).__name__}.")
    folder = _out_dir(out_dir)
    return _write_stamped(folder, name, {"csv": (folder / f"{name}.csv",
                                                 lambda path: table.to_csv(path, index=False))})["csv"]


def save_html(html: str, name: str, out_dir: str | Path | None = None) -> Path:
    """Write an interactive render (e.g. ``treescope.render_to_html(...)``) to ``<dir>/<name>.html``, with its
    stamp ``<name>.stamp.json``."""
    _check_name(name)
    if not isinstance(html, str):
        raise TypeError(f"html must be a str; got {type(html).__name__}.")
    folder = _out_dir(out_dir)
    written = _write_stamped(
        folder, name, {"html": (folder / f"{name}.html", lambda path: path.write_text(html, encoding="utf-8"))}
    )
    return written["html"]


# --------------------------------------------------------------------------------------------------
# Weight views: one linear of two sub-models, and where their masks differ


def plot_weight_views(
    weight_a: torch.Tensor, weight_b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor,
    labels: tuple[str, str], title: str, max_pixels: int = 1024,
) -> Any:
    """Static figure, three panels: |W| of sub-model A, |W| of sub-model B (pruned weights white), and the
    positions where their masks differ (red: pruned only in A, blue: pruned only in B). Large matrices are
    shown as their top-left ``max_pixels`` x ``max_pixels`` block (said in the panel title)."""
    import matplotlib.colors as mcolors
    import numpy as np

    rows, columns = weight_a.shape
    r, c = min(rows, max_pixels), min(columns, max_pixels)
    crop = "" if (r, c) == (rows, columns) else f"\n(top-left {r} x {c} of {rows} x {columns})"
    fig, axes = new_figure(1, 3, figsize=(12, 4.4))
    vmax = float(max(weight_a.abs().max(), weight_b.abs().max())) or 1.0
    for ax, weight, mask, label in zip(axes[:2], (weight_a, weight_b), (mask_a, mask_b), labels, strict=True):
        shown = np.ma.masked_array(weight[:r, :c].abs().float().numpy(), mask=mask[:r, :c].numpy())
        image = ax.imshow(shown, cmap="viridis", norm=mcolors.PowerNorm(0.5, vmin=0, vmax=vmax),
                          interpolation="nearest", aspect="auto")
        ax.set_title(f"|W|, calibrated on {label}{crop}")
        ax.grid(False)
        ax.set_xlabel("input column")
    axes[0].set_ylabel("output row")
    fig.colorbar(image, ax=axes[1], shrink=0.8, label="|weight| (pruned: white)")
    difference = pruning.mask_difference(mask_a[:r, :c], mask_b[:r, :c]).numpy()
    colours = mcolors.ListedColormap(["white", "tab:red", "tab:blue", "0.8"])
    axes[2].imshow(difference, cmap=colours, vmin=-0.5, vmax=3.5, interpolation="nearest", aspect="auto")
    share = float((difference == pruning.PRUNED_ONLY_A).mean() + (difference == pruning.PRUNED_ONLY_B).mean())
    axes[2].set_title(f"masks differ at {share:.1%} of weights{crop}\nred: pruned only in {labels[0]}, "
                      f"blue: only in {labels[1]}, grey: both")
    axes[2].set_xlabel("input column")
    axes[2].grid(False)
    fig.suptitle(title)
    return fig


def difference_block(mask_a: torch.Tensor, mask_b: torch.Tensor, rows: int = 64, columns: int = 64
                     ) -> tuple[slice, slice]:
    """The ``rows`` x ``columns`` block (on a grid of half-block steps) where the two masks differ at the most
    positions: a crop that shows the differences (the whole matrices make a treescope page of megabytes)."""
    if mask_a.shape != mask_b.shape or mask_a.dim() != 2:
        raise ValueError(f"two 2-D masks of one shape are needed; got {tuple(mask_a.shape)} and {tuple(mask_b.shape)}.")
    if rows < 1 or columns < 1:
        raise ValueError(f"rows and columns must be >= 1; got {rows} x {columns}.")
    rows, columns = min(rows, mask_a.shape[0]), min(columns, mask_a.shape[1])
    differ = (mask_a != mask_b).float()[None, None]  # [1, 1, R, C]
    stride = (max(rows // 2, 1), max(columns // 2, 1))
    counts = torch.nn.functional.avg_pool2d(differ, (rows, columns), stride=stride)[0, 0]  # mean per block
    index = int(counts.flatten().argmax())
    top, left = divmod(index, counts.shape[1])
    top, left = top * stride[0], left * stride[1]
    return slice(top, top + rows), slice(left, left + columns)


def treescope_weight_views(
    weight_a: torch.Tensor, weight_b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor,
    labels: tuple[str, str], pixels_per_cell: float = 1,
) -> str:
    """Interactive HTML (treescope): both weight matrices, zero-centred colours with pruned weights shown
    as invalid cells, and the mask-difference map (hover a cell for its value)."""
    import treescope

    def array(tensor: torch.Tensor) -> Any:
        return tensor.detach().float().cpu().numpy()  # treescope renders numpy arrays, not torch tensors

    parts: list[Any] = []
    for weight, mask, label in zip((weight_a, weight_b), (mask_a, mask_b), labels, strict=True):
        parts += [treescope.figures.bolded(f"W calibrated on {label} (pruned weights blank)\n"),
                  treescope.render_array(array(weight), valid_mask=~mask.cpu().numpy(), around_zero=True,
                                         pixels_per_cell=pixels_per_cell), "\n\n"]
    difference = pruning.mask_difference(mask_a, mask_b).cpu().numpy()
    parts += [treescope.figures.bolded(f"Where the masks differ (1: pruned only in {labels[0]}, "
                                       f"2: only in {labels[1]}, 3: both)\n"),
              treescope.render_array(difference, continuous=False, pixels_per_cell=pixels_per_cell,
                                     value_item_labels={pruning.KEPT_BOTH: "kept by both", pruning.PRUNED_ONLY_A: f"only {labels[0]}",
                                                        pruning.PRUNED_ONLY_B: f"only {labels[1]}", pruning.PRUNED_BOTH: "both"})]
    return treescope.render_to_html(treescope.figures.inline(*parts), compressed=True)
