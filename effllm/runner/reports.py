"""HTML reports: an executed notebook as one self-contained page.

run_all renders every notebook that succeeds with nbconvert's `HTMLExporter` (its JupyterLab template)
and publishes the page with the notebook's figures, at ``<figures folder>/notebooks/NN_title.html``. The
figures are in it as ``data:image/png;base64`` images (the kernel draws them inline, as in JupyterLab), and
the page loads nothing: the template's scripts that would fetch require.js, MathJax, Mermaid and the
widget renderer from a CDN are left out (the notebooks have no LaTeX in their text and no diagrams).
Widget outputs, tqdm's progress bars among them, are left out of the page too: without a kernel they can
only show their text fallback, frozen at the state they started in ("0%| | 0/8"). The executed
notebook keeps them. The page opens from a file, offline, in any browser.
"""

from __future__ import annotations

import copy
from pathlib import Path

from effllm.paths import write_atomic

REPORTS_FOLDER = "notebooks"  # below the figures folder
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# nbconvert's JupyterLab page without the blocks that load code from elsewhere.
OFFLINE_TEMPLATE = """\
{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def render_report(executed: str | Path, target: str | Path, title: str | None = None) -> Path:
    """Write the executed notebook ``executed`` (.ipynb) as a self-contained HTML page to ``target``
    (atomically: readers see the old page or the whole new one). ``title`` defaults to the file's stem."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    executed, target = Path(executed), Path(target)
    nb = copy.deepcopy(nbformat.read(executed, as_version=4))
    nb.metadata.pop("widgets", None)  # saved widget state: only the CDN renderer left out above would use it
    for cell in nb.cells:
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
    # embed_images: images that markdown cells link to become data URIs too.
    exporter = HTMLExporter(template_name="lab", template_file="effllm_report.html.j2", embed_images=True,
                            extra_loaders=[jinja2.DictLoader({"effllm_report.html.j2": OFFLINE_TEMPLATE})])
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title or executed.stem}})
    write_atomic(target, body.encode("utf-8"))
    return target
