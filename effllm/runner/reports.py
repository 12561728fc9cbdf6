"""HTML reports: an executed notebook as one self-contained page.

run_all renders every notebook that succeeds with nbconvert's `HTMLExporter` (the JupyterLab look) and
publishes the page with the notebook's figures, at ``<figures folder>/notebooks/NN_title.html``. The
figures are in it as ``data:image/png;base64`` images (the kernel draws them inline, as in JupyterLab), and
the page loads nothing from the network: nbconvert's default template would fetch MathJax and require.js
from a CDN, which the notebooks do not need (no LaTeX in their text, no widgets), so both are left out.
The page opens from a file, offline, in any browser.
"""

from __future__ import annotations

from pathlib import Path

from effllm.paths import write_atomic

REPORTS_FOLDER = "notebooks"  # below the figures folder


def render_report(executed: str | Path, target: str | Path, title: str | None = None) -> Path:
    """Write the executed notebook ``executed`` (.ipynb) as a self-contained HTML page to ``target``
    (atomically: readers see the old page or the whole new one). ``title`` defaults to the file's stem."""
    import nbformat
    from nbconvert import HTMLExporter

    executed, target = Path(executed), Path(target)
    nb = nbformat.read(executed, as_version=4)
    # embed_images: images that markdown cells link to become data URIs too. mathjax_url / require_js_url
    # empty: no <script src=...> from a CDN, so nothing is fetched when the page is opened.
    exporter = HTMLExporter(embed_images=True, mathjax_url="", require_js_url="")
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title or executed.stem}})
    write_atomic(target, body.encode("utf-8"))
    return target
