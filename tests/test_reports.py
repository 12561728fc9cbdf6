"""HTML reports: a notebook that draws a figure, run through run_all, is published as one self-contained page
with the figure embedded, which a headless browser renders (where Chromium is installed)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import nbformat
import pytest

from effllm.runner import cli, render_report

PLOT = """\
# %% tags=["parameters"]
profile = "unset"
model_name = "unset"
seed = -1
figures_dir = "unset"

# %% [markdown]
# # Squares, drawn
#
# One figure, shown inline and saved to `figures_dir`.

# %%
import pathlib
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([0, 1, 2, 3], [0, 1, 4, 9], marker="o")
ax.set_title("squares")
fig.savefig(pathlib.Path(figures_dir) / "squares.png")

# %%
from tqdm.auto import tqdm
for _ in tqdm(range(3), desc="squares-progress"):
    pass
print("report-check: the last cell ran")
"""

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("report")
    (root / "nb").mkdir()
    (root / "nb" / "00_plot.py").write_text(textwrap.dedent(PLOT))
    code = cli.main(["--profile", "smoke", "--notebooks-dir", str(root / "nb"), "--build-dir", str(root / "build")])
    assert code == 0
    publish = root / "build" / "smoke" / "figures"
    (entry,) = json.loads((root / "build" / "smoke" / "summary.json").read_text())["notebooks"]
    return dict(root=root, publish=publish, entry=entry, path=publish / "notebooks" / "00_plot.html",
                executed=root / "build" / "smoke" / "executed" / "00_plot.ipynb")


def test_report_is_published_beside_the_figures(report):
    assert report["entry"]["report"] == str(report["path"]) and report["path"].is_file()
    assert report["entry"]["figures"] == ["squares.png"]


def test_report_embeds_the_figure_and_fetches_nothing(report):
    html = report["path"].read_text(encoding="utf-8")
    images = re.findall(r'<img[^>]+src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 1, "the inline figure is not in the page as a data URI"
    assert base64.b64decode(images[0]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<title>00_plot</title>" in html and "Squares, drawn" in html
    assert "report-check: the last cell ran" in html
    # Nothing to load from elsewhere: no script at all (nbconvert's template would fetch require.js, MathJax,
    # Mermaid and the widget renderer from a CDN), no stylesheet, image or frame from a URL.
    assert re.findall(r"<script\b[^>]*>", html) == []
    external = re.findall(r'<(?:link|img|iframe)\b[^>]*\b(?:src|href)="(?!data:)([^"#]*)"', html)
    assert external == []
    assert "cdnjs" not in html and "unpkg" not in html


def test_report_leaves_out_frozen_progress_bars(report):
    """A tqdm bar is a widget: the executed notebook keeps it, the static page leaves it out (it would show
    its text fallback, frozen where it started)."""
    bar = re.compile(r"squares-progress:\s+\d+%")  # the bar's text fallback, not the code that made it
    executed = report["executed"].read_text(encoding="utf-8")
    assert bar.search(executed) and "application/vnd.jupyter.widget-view+json" in executed
    html = report["path"].read_text(encoding="utf-8")
    assert not bar.search(html) and "application/vnd.jupyter.widget-view+json" not in html


def test_report_has_no_error_outputs(report):
    nb = nbformat.read(report["executed"], as_version=4)
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    html = report["path"].read_text(encoding="utf-8")
    # error outputs and stderr render as <div ... data-mime-type="application/vnd.jupyter.stderr">
    assert 'data-mime-type="application/vnd.jupyter.stderr"' not in html and "Traceback" not in html


def test_report_is_readable_like_any_new_file(report):
    """Published with the permissions a plain new file gets (the umask's), not a temporary file's 0600."""
    plain = report["path"].parent / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(report["path"].stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    plain.unlink()


def test_render_report_writes_the_page_atomically(report, tmp_path):
    target = tmp_path / "again" / "page.html"
    assert render_report(report["executed"], target, title="again") == target
    assert "<title>again</title>" in target.read_text(encoding="utf-8")
    assert [p.name for p in target.parent.iterdir()] == ["page.html"]  # no temporary file left behind


@pytest.mark.skipif(chromium() is None, reason=f"no Chromium on this machine (looked for {', '.join(CHROMIUM_NAMES)}); "
                    "apt-get install chromium to run the browser check")
def test_report_renders_in_a_headless_browser(report, tmp_path):
    """Open the page from its file, offline, as a reader would: the figure is decoded and drawn."""
    import numpy as np
    from PIL import Image

    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}"]
    url = report["path"].as_uri()
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Squares, drawn" in dom.stdout and 'src="data:image/png;base64,' in dom.stdout

    shot = tmp_path / "report.png"
    subprocess.run([*browser, "--hide-scrollbars", "--window-size=1000,1400", f"--screenshot={shot}", url],
                   capture_output=True, text=True, timeout=120, check=True)
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.size == (1000, 1400)
    # The plot's line is drawn in matplotlib's first colour (C0, #1f77b4): pixels of it mean the embedded
    # PNG was decoded and painted, not just that a page came up.
    pixels = np.asarray(image, dtype=np.int16)
    blue = int((np.abs(pixels - np.array([0x1F, 0x77, 0xB4])) < 40).all(axis=-1).sum())
    assert blue > 200, f"only {blue} pixels of the plotted line's colour in the screenshot"
    Path(report["root"] / "screenshot.png").write_bytes(shot.read_bytes())  # for a person to look at
