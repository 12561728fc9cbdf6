"""Stamped artefacts (effllm.stamps): the stamp beside every saved file, the claims report and the README refusing
to mix stamps, and the runner setting what a stamp says of its run."""

from __future__ import annotations

import json
import re
import textwrap
import warnings
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

from effllm import plots, stamps
from effllm.experiments import claims, readme, session
from effllm.paths import REPO_ROOT
from effllm.runner import jobs as runner_jobs
from effllm.runner.profiles import ProfileError, read_profile

matplotlib.use("Agg")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in (*stamps.STAMP_ENVIRONMENT, "EFFLLM_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    stamps.reset_context()
    yield
    stamps.reset_context()


def _run(monkeypatch, dtype: str = "float32", profile: str = "smoke", commit: str = COMMIT) -> None:
    """What run_all.py puts into a kernel: the profile, the commit and the precision."""
    monkeypatch.setenv(stamps.PROFILE_ENV, profile)
    monkeypatch.setenv(stamps.COMMIT_ENV, commit)
    monkeypatch.setenv(stamps.DIRTY_ENV, "0")
    monkeypatch.setenv("EFFLLM_DTYPE", dtype)


def _table() -> pd.DataFrame:
    return pd.DataFrame({"x": [1, 2], "y": [0.5, 0.25]})


def _figure():
    fig, ax = plots.new_figure()
    ax.plot([1, 2], [3, 4])
    return fig


def _readme(path: Path, *names: str) -> Path:
    path.write_text("intro\n" + "".join(f"{readme._begin(n)}\nold\n{readme._end(n)}\n" for n in names))
    return path


# ---- the stamp beside every saved file -------------------------------------------------------------


def test_a_stamp_is_written_beside_each_saved_figure_table_and_page(tmp_path, monkeypatch):
    _run(monkeypatch, dtype="float32", profile="smoke")
    written = plots.save_figure(_figure(), "01_speed", table=_table(), out_dir=tmp_path)
    plots.save_table(_table(), "01_items", out_dir=tmp_path)
    plots.save_html("<p>tokens</p>", "01_page", out_dir=tmp_path)
    assert set(written) == {"pdf", "png", "csv"}  # the sidecar is not one of the artefacts returned
    stamp = json.loads((tmp_path / "01_speed.stamp.json").read_text())
    assert stamp["files"] == ["01_speed.csv", "01_speed.pdf", "01_speed.png"]
    assert (stamp["commit"], stamp["dirty"], stamp["profile"], stamp["dtype"]) == (COMMIT, False, "smoke", "float32")
    assert stamp["machine"] == stamps.machine_description()
    if not torch.cuda.is_available():  # the CPU: its model, its kind and the thread count
        assert re.search(r"\((avx2|avx512|avx512_bf16|\w+), \d+ threads?\)$", stamp["machine"]), stamp["machine"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", stamp["written_at"])
    assert json.loads((tmp_path / "01_items.stamp.json").read_text())["files"] == ["01_items.csv"]
    assert json.loads((tmp_path / "01_page.stamp.json").read_text())["files"] == ["01_page.html"]
    found = stamps.folder_stamps(tmp_path)
    assert sorted(found) == ["01_items.csv", "01_page.html", "01_speed.csv", "01_speed.pdf", "01_speed.png"]
    check = stamps.check_stamps(found, "these")
    assert check.status == "agree" and check.stamp["dtype"] == "float32"
    assert check.line() == (f"Stamp: commit {COMMIT[:12]}, profile smoke, dtype float32, machine "
                            f"{stamps.machine_description()}.")


def test_a_page_and_a_figure_of_one_name_share_one_sidecar(tmp_path, monkeypatch):
    """Notebook 01 saves 01_generation_by_exit_layer.html, then the figure of the same name: one run, one stamp."""
    _run(monkeypatch)
    plots.save_html("<p>x</p>", "01_generation", out_dir=tmp_path)
    plots.save_figure(_figure(), "01_generation", table=_table(), out_dir=tmp_path)
    stamp = json.loads((tmp_path / "01_generation.stamp.json").read_text())
    assert stamp["files"] == ["01_generation.csv", "01_generation.html", "01_generation.pdf", "01_generation.png"]
    assert stamps.check_stamps(stamps.folder_stamps(tmp_path), "these").status == "agree"


def test_a_file_left_over_from_an_earlier_run_counts_as_unstamped(tmp_path, monkeypatch):
    _run(monkeypatch, commit="a" * 40)
    plots.save_figure(_figure(), "02_quality", table=_table(), out_dir=tmp_path)
    _run(monkeypatch, commit="b" * 40)
    plots.save_figure(_figure(), "02_quality", out_dir=tmp_path)  # this run draws no table: the old csv stays
    found = stamps.folder_stamps(tmp_path)
    assert found["02_quality.csv"] is None and found["02_quality.png"]["commit"] == "b" * 40
    with pytest.raises(stamps.MixedStampsError, match="unstamped: 02_quality.csv"):
        stamps.check_stamps(found, "The artefacts")


def test_open_session_names_the_profile_and_the_model_dtype(monkeypatch):
    model = torch.nn.Linear(2, 2).to(torch.float16)
    monkeypatch.setattr(session, "load_model", lambda name, dtype=None, device=None: (model, None))
    monkeypatch.setenv("EFFLLM_DTYPE", "float32")
    session.open_session("tiny", "cpu", profile="default")
    stamp = stamps.run_stamp()
    assert stamp["profile"] == "default" and stamp["model_dtype"] == "float16" and stamp["dtype"] == "float32"
    monkeypatch.setenv(stamps.PROFILE_ENV, "smoke")  # run_all.py's profile wins over the notebook's parameter
    assert stamps.run_stamp()["profile"] == "smoke"
    stamps.reset_context()
    monkeypatch.delenv(stamps.PROFILE_ENV)
    assert stamps.run_stamp()["profile"] == stamps.INTERACTIVE


def test_git_state_reads_head_and_ignores_generated_files(tmp_path, monkeypatch):
    assert stamps.git_state(tmp_path) == (stamps.UNKNOWN_COMMIT, False)  # not a repository's top
    original = stamps._git
    answers = {"rev-parse --show-toplevel": f"{tmp_path}\n", "rev-parse HEAD": f"{COMMIT}\n"}

    def fake_git(status: str):
        def git(root, *args):
            return status if args[0] == "status" else answers[" ".join(args)]
        return git

    generated = " M figures/01_a.png\0 M results/x.json\0 M notebooks/01_early_exit.ipynb\0 M README.md\0" \
                " M build/smoke/summary.json\0"
    monkeypatch.setattr(stamps, "_git", fake_git(generated))
    assert stamps.git_state(tmp_path) == (COMMIT, False)
    monkeypatch.setattr(stamps, "_git", fake_git(generated + " M effllm/plots.py\0"))
    assert stamps.git_state(tmp_path) == (COMMIT, True)
    monkeypatch.setattr(stamps, "_git", fake_git("R  notebooks/01_new.ipynb\0effllm/old.py\0"))  # renamed from code
    assert stamps.git_state(tmp_path) == (COMMIT, True)
    if (REPO_ROOT / ".git").exists():
        monkeypatch.setattr(stamps, "_git", original)
        assert re.fullmatch(r"[0-9a-f]{40}", stamps.git_state(REPO_ROOT)[0])


# ---- the claims report and the README refuse mixed stamps ----------------------------------------------


def _two_dtypes(folder: Path, monkeypatch) -> None:
    _run(monkeypatch, dtype="float32")
    plots.save_table(_table(), "00_first", out_dir=folder)
    _run(monkeypatch, dtype="bfloat16")
    plots.save_table(_table(), "00_second", out_dir=folder)


def test_two_tables_of_different_dtypes_make_the_claims_refuse(tmp_path, monkeypatch):
    _two_dtypes(tmp_path, monkeypatch)
    with pytest.raises(stamps.MixedStampsError) as refused:
        claims.build_claims(tmp_path)
    message = str(refused.value)
    assert "differ in dtype" in message
    assert re.search(r"dtype float32, machine .*: 00_first\.csv \(1\)", message), message
    assert re.search(r"dtype bfloat16, machine .*: 00_second\.csv \(1\)", message), message
    assert "python run_all.py --profile smoke" in message and stamps.ALLOW_FLAG in message
    assert claims.main(["--figures", str(tmp_path), "--no-readme"]) == 1
    assert not (tmp_path / "claims.csv").exists()  # refused: nothing written


def test_two_tables_of_different_dtypes_make_the_readme_refuse(tmp_path, monkeypatch, capsys):
    figures, results = tmp_path / "figures", tmp_path / "results"
    results.mkdir()
    _two_dtypes(figures, monkeypatch)
    text = _readme(tmp_path / "README.md", "claims", "run-times").read_text()
    with pytest.raises(stamps.MixedStampsError, match="differ in dtype"):
        readme.render(text, results, figures)
    arguments = ["--readme", str(tmp_path / "README.md"), "--results", str(results), "--figures", str(figures)]
    assert readme.main([*arguments, "--check"]) == 1
    assert readme.main(arguments) == 1
    assert "refused, nothing written" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == text and not (figures / "claims.csv").exists()


def test_allow_mixed_stamps_writes_the_mixed_line(tmp_path, monkeypatch, capsys):
    figures, results = tmp_path / "figures", tmp_path / "results"
    results.mkdir()
    _two_dtypes(figures, monkeypatch)
    with pytest.warns(stamps.StampWarning):
        assert claims.main(["--figures", str(figures), "--no-readme", stamps.ALLOW_FLAG]) == 0
    assert capsys.readouterr().out.startswith("MIXED STAMPS: ")
    made_from = json.loads((figures / "claims.stamp.json").read_text())["made_from"]
    assert made_from["status"] == "mixed" and len(made_from["groups"]) == 2
    _readme(tmp_path / "README.md", "claims")
    with pytest.warns(stamps.StampWarning):
        assert readme.main(["--readme", str(tmp_path / "README.md"), "--results", str(results), "--figures",
                            str(figures), stamps.ALLOW_FLAG]) == 0
    block = (tmp_path / "README.md").read_text()
    (line,) = [line for line in block.splitlines() if line.startswith("MIXED STAMPS: ")]
    assert "dtype float32" in line and "dtype bfloat16" in line and stamps.ALLOW_FLAG in line


def test_unstamped_tables_only_are_accepted_with_a_warning(tmp_path):
    _table().to_csv(tmp_path / "00_first.csv", index=False)  # written before stamping
    _table().to_csv(tmp_path / "00_second.csv", index=False)
    with pytest.warns(stamps.StampWarning, match="none of the 2 artefact"):
        table = claims.build_claims(tmp_path)
    assert claims.markdown(table).startswith("Stamp: none (written before artefacts were stamped).\n\n| seed |")
    claims.write_claims(table, tmp_path)
    assert (tmp_path / "claims.csv").is_file() and not (tmp_path / "claims.stamp.json").exists()


def test_a_stamped_table_beside_an_unstamped_one_is_refused(tmp_path, monkeypatch):
    _table().to_csv(tmp_path / "00_first.csv", index=False)
    _run(monkeypatch)
    plots.save_table(_table(), "00_second", out_dir=tmp_path)
    with pytest.raises(stamps.MixedStampsError, match=r"stamped vs unstamped[\s\S]*unstamped: 00_first\.csv"):
        claims.build_claims(tmp_path)


def test_one_run_gives_the_report_its_stamp_line(tmp_path, monkeypatch):
    figures, results = tmp_path / "figures", tmp_path / "results"
    _run(monkeypatch, profile="default")
    plots.save_table(_table(), "00_first", out_dir=figures)
    plots.save_figure(_figure(), "00_second", table=_table(), out_dir=figures)
    table = claims.build_claims(figures)
    line = f"Stamp: commit {COMMIT[:12]}, profile default, dtype float32, machine {stamps.machine_description()}."
    assert claims.markdown(table).splitlines()[0] == line
    claims.write_claims(table, figures)
    assert json.loads((figures / "claims.stamp.json").read_text())["made_from"]["stamp"]["commit"] == COMMIT
    assert claims.build_claims(figures).attrs["stamp"]["status"] == "agree"  # claims.* are not among the tables
    # the run-times block: the run summary must come from the run that made the figures
    results.mkdir()
    summary = {"notebooks": [{"notebook": "00_quickstart", "status": "ok", "seconds": 60.0}],
               "stamp": stamps.run_stamp("default")}
    (results / readme.RUN_SUMMARY).write_text(json.dumps(summary))
    text = _readme(tmp_path / "README.md", "claims", "run-times").read_text()
    rendered = readme.render(text, results, figures)
    assert rendered.count(line) == 2
    (results / readme.RUN_SUMMARY).write_text(json.dumps({**summary, "stamp": stamps.run_stamp("smoke")}))
    with pytest.raises(stamps.MixedStampsError, match=r"profile smoke, .*: results/run_all_default\.json"):
        readme.render(text, results, figures)


def test_benchmark_files_of_one_block_may_differ_in_dtype_only(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    _run(monkeypatch, dtype="float32", profile="bench")
    (results / "early_exit_m_float32.json").write_text(json.dumps({"stamp": stamps.run_stamp()}))
    _run(monkeypatch, dtype="bfloat16", profile="bench")
    (results / "early_exit_m_bfloat16.json").write_text(json.dumps({"stamp": stamps.run_stamp()}))
    assert readme.block_stamps("early-exit", results, tmp_path / "figures").status == "agree"
    _run(monkeypatch, dtype="bfloat16", profile="bench", commit="c" * 40)
    (results / "early_exit_m_bfloat16.json").write_text(json.dumps({"stamp": stamps.run_stamp()}))
    with pytest.raises(stamps.MixedStampsError, match="differ in commit"):
        readme.block_stamps("early-exit", results, tmp_path / "figures")


def test_the_committed_figures_are_accepted():
    """No committed artefact has a stamp yet: all unstamped is accepted (a warning), and the README renders."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stamps.StampWarning)
        check = claims.check_folder_stamps(REPO_ROOT / "figures")
    assert check.status in ("unstamped", "agree")


# ---- the runner sets what the stamp says of its run ------------------------------------------------


def test_the_runner_sets_the_profile_and_the_commit_for_every_kernel(tmp_path):
    notebook = tmp_path / "00_tiny.py"
    notebook.write_text(textwrap.dedent("""\
        # %% tags=["parameters"]
        profile = "unset"
        figures_dir = None

        # %%
        print(profile)
        """))
    jobs, _ = runner_jobs.build_jobs([notebook], "smoke", tmp_path / "build")
    (job,) = jobs
    commit, dirty = stamps.git_state()
    assert job.env[stamps.PROFILE_ENV] == "smoke"
    assert job.env[stamps.COMMIT_ENV] == commit and job.env[stamps.DIRTY_ENV] == ("1" if dirty else "0")
    # what a kernel with that environment stamps, whatever the notebook passed as its profile
    stamps.set_context(profile="default")
    stamp = stamps.run_stamp(environ=job.env)
    assert (stamp["profile"], stamp["commit"], stamp["dirty"]) == ("smoke", commit, dirty)
    with pytest.raises(ProfileError, match="EFFLLM_PROFILE is set by run_all.py"):
        read_profile('environment: {EFFLLM_PROFILE: "paper"}', "x.yaml")


def test_the_run_summary_carries_the_stamp_its_notebooks_wrote(tmp_path, monkeypatch):
    _run(monkeypatch, profile="smoke")
    publish = tmp_path / "publish"
    plots.save_table(_table(), "00_table", out_dir=publish)
    job = runner_jobs.Job(notebook=tmp_path / "00_tiny.py", parameters={}, output_path=tmp_path / "x.ipynb",
                          staging_dir=tmp_path / "staging", publish_dir=publish, env={})
    result = runner_jobs.JobResult("00_tiny", "ok", 1.0, ["00_table.csv", "00_table.stamp.json"])
    stamp = runner_jobs.summary_stamp([job], [result], "smoke")
    written = json.loads((publish / "00_table.stamp.json").read_text())
    assert {k: stamp[k] for k in stamps.COMPARED} == {k: written[k] for k in stamps.COMPARED}
    runner_jobs.write_summary(tmp_path / "summary.json", "smoke", publish, [result], stamp=stamp)
    assert json.loads((tmp_path / "summary.json").read_text())["stamp"]["profile"] == "smoke"
