"""Figure saving: the files, their formats, atomicity, names and the output folder."""

from __future__ import annotations

import json

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from effllm import plots

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _reset_figures_dir():
    plots.set_figures_dir(None)
    yield
    plots.set_figures_dir(None)
    plt.close("all")


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sparsity": [0.0, 0.25, 0.5],
            "perplexity": [12.5, 13.25, 19.125],
            "method": ["dense", "wanda", "wanda"],
        }
    )


def _figure(table: pd.DataFrame):
    fig, ax = plots.new_figure()
    ax.plot(table["sparsity"], table["perplexity"], marker="o")
    ax.set_title("Perplexity against sparsity")
    plots.caption(ax, model="tiny-llama", data="random tokens")
    return fig


def test_save_figure_writes_pdf_png_csv(tmp_path, table):
    written = plots.save_figure(_figure(table), "01_perplexity", table=table, out_dir=tmp_path)
    assert written == {ext: tmp_path / f"01_perplexity.{ext}" for ext in ("pdf", "png", "csv")}
    assert written["pdf"].read_bytes().startswith(b"%PDF")
    assert written["png"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    pd.testing.assert_frame_equal(pd.read_csv(written["csv"]), table)
    # beside them their stamp (effllm.stamps; tests/test_stamps.py checks its fields), which lists them
    sidecar = tmp_path / "01_perplexity.stamp.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([sidecar.name, *(p.name for p in written.values())])
    assert json.loads(sidecar.read_text())["files"] == sorted(p.name for p in written.values())


def test_without_table_no_csv(tmp_path, table):
    written = plots.save_figure(_figure(table), "plain", out_dir=tmp_path)
    assert set(written) == {"pdf", "png"}
    assert not (tmp_path / "plain.csv").exists()


def test_failure_midway_leaves_nothing(tmp_path, table, monkeypatch):
    fig = _figure(table)
    real_savefig = fig.savefig
    calls = []

    def savefig_failing_on_second(*args, **kwargs):
        calls.append(kwargs.get("format"))
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_savefig(*args, **kwargs)

    monkeypatch.setattr(fig, "savefig", savefig_failing_on_second)
    with pytest.raises(OSError, match="simulated"):
        plots.save_figure(fig, "broken", table=table, out_dir=tmp_path)
    assert calls == ["pdf", "png"]
    assert list(tmp_path.iterdir()) == []  # no final names, no temporary files


def test_failure_keeps_previous_complete_files(tmp_path, table, monkeypatch):
    fig = _figure(table)
    plots.save_figure(fig, "kept", table=table, out_dir=tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}  # the stamp too

    def failing_to_csv(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    with pytest.raises(ValueError, match="boom"):
        plots.save_figure(fig, "kept", table=table, out_dir=tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


@pytest.mark.parametrize("name", ["", "a/b", "../up", "with space", ".hidden", "fig.png", "fig.PDF", "é"])
def test_bad_names_raise(tmp_path, table, name):
    with pytest.raises(ValueError, match="letters, digits|extension"):
        plots.save_figure(_figure(table), name, out_dir=tmp_path)
    with pytest.raises(ValueError):
        plots.save_html("<p>x</p>", name, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_dotted_and_dashed_names_allowed(tmp_path, table):
    written = plots.save_figure(_figure(table), "fig-2.v1_a", out_dir=tmp_path)
    assert written["png"].name == "fig-2.v1_a.png"


def test_set_figures_dir_and_environment(tmp_path, table, monkeypatch):
    env_dir, chosen = tmp_path / "env", tmp_path / "chosen" / "nested"
    monkeypatch.setenv("EFFLLM_FIGURES", str(env_dir))
    assert plots.save_figure(_figure(table), "from_env")["pdf"] == env_dir / "from_env.pdf"
    plots.set_figures_dir(chosen)
    assert plots.current_figures_dir() == chosen
    assert plots.save_figure(_figure(table), "from_setting")["png"] == chosen / "from_setting.png"
    assert (chosen / "from_setting.pdf").is_file()
    explicit = tmp_path / "explicit"
    assert plots.save_figure(_figure(table), "explicit", out_dir=explicit)["pdf"].parent == explicit
    plots.set_figures_dir(None)
    assert plots.current_figures_dir() == env_dir


def test_save_html(tmp_path):
    path = plots.save_html("<div>render</div>", "attention_map", out_dir=tmp_path)
    assert path == tmp_path / "attention_map.html"
    assert path.read_text(encoding="utf-8") == "<div>render</div>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention_map.html", "attention_map.stamp.json"]


def test_style_is_idempotent_and_set():
    plots.set_style()
    first = dict(matplotlib.rcParams)
    plots.set_style()
    assert dict(matplotlib.rcParams) == first
    assert matplotlib.rcParams["pdf.fonttype"] == 42
    assert matplotlib.rcParams["savefig.bbox"] == "tight"
    assert matplotlib.rcParams["savefig.dpi"] == plots.PNG_DPI


def test_png_resolution(tmp_path):
    fig, _ = plots.new_figure(figsize=(2, 1))
    png = plots.save_figure(fig, "size", out_dir=tmp_path)["png"].read_bytes()
    chunk = png.index(b"pHYs")  # pixels per metre, x and y
    per_metre = int.from_bytes(png[chunk + 4 : chunk + 8], "big")
    assert per_metre * 0.0254 == pytest.approx(plots.PNG_DPI, abs=0.5)


def test_caption():
    assert plots.provenance(model="M", data="D", extra="n=3") == "model: M · data: D · n=3"
    fig, ax = plots.new_figure()
    plots.caption(ax, model="M", data="D")
    assert ax.get_title() == "model: M · data: D"
    ax.set_title("Title")
    plots.caption(ax, data="D")
    assert ax.get_title() == "Title\ndata: D"
    note = plots.caption(fig, model="M")
    assert note.get_text() == "model: M" and note in fig.texts
    with pytest.raises(ValueError):
        plots.provenance()


def test_save_table_writes_the_csv_atomically(tmp_path, table, monkeypatch):
    path = plots.save_table(table, "04_items", out_dir=tmp_path)
    assert path == tmp_path / "04_items.csv" and pd.read_csv(path).equals(table)
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, p, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        plots.save_table(table, "04_items", out_dir=tmp_path)
    assert pd.read_csv(path).equals(table)  # the earlier file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["04_items.csv", "04_items.stamp.json"]  # no temporary file
    with pytest.raises(ValueError, match="not a plain file stem"):
        plots.save_table(table, "a/b", out_dir=tmp_path)
    with pytest.raises(TypeError, match="DataFrame"):
        plots.save_table([1, 2], "x", out_dir=tmp_path)


def test_difference_block_finds_where_the_masks_differ():
    mask_a = torch.zeros(200, 300, dtype=torch.bool)
    mask_b = mask_a.clone()
    mask_b[96:160, 128:192] = True  # the only differences: one 64 x 64 block on the half-block grid
    rows, columns = plots.difference_block(mask_a, mask_b, 64, 64)
    assert (rows, columns) == (slice(96, 160), slice(128, 192))
    small = plots.difference_block(mask_a[:10, :10], mask_b[:10, :10], 64, 64)
    assert small == (slice(0, 10), slice(0, 10))  # a block larger than the matrix is the whole matrix
    with pytest.raises(ValueError, match="one shape"):
        plots.difference_block(mask_a, mask_b[:5], 64, 64)
