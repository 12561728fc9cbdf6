"""Sweep-level steps (effllm.runner.summaries): the Wanda sweep's mask comparison across runs. Each run saves
one mask set; the summary loads them all (checked against their checksums and the model's fingerprint) and
writes the Jaccard matrix per pruning setting, same- against cross-domain overlap and weight views."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from effllm import data, pruning, runner
from effllm.models import load_model
from effllm.runner import cli
from effllm.runner.jobs import JobResult
from effllm.runner.summaries import SummaryError, SummarySpec, main, run_summary
from effllm.runner.sweeps import Sweep, SweepError, load_sweep, write_sweep_summary

# Labels -> the built-in corpus their (tiny) masks are calibrated on; the labels' domains are the seed's:
# math_instruct and math_orca are math, python_alpaca code.
SETS = {"math_instruct": "arithmetic", "math_orca": "python-docs", "python_alpaca": "python-code"}
SETTINGS = [{"pattern": "unstructured", "sparsity": 0.5}, {"pattern": "2:4"}]


def group_of(setting: dict) -> str:
    """The summary's name for a pruning setting: the swept values besides the calibration set."""
    return "_".join(f"{k}-{v}" for k, v in setting.items()).replace(":", "-")


def _prune(model, tokenizer, corpus, setting):
    calibration = data.calibration(corpus, tokenizer, n_samples=2, seq_len=16, split="train")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = pruning.prune(model, "wanda", setting.get("sparsity"), setting["pattern"], calibration=calibration)
    with torch.no_grad():  # back to dense for the next mask set
        for name, parameter in model.named_parameters():
            parameter.copy_(dense[name])
    return masks


def make_sweep_folder(root: Path, model_name: str = "tiny-llama") -> tuple[Path, dict]:
    """A sweep's figure folder as `run_all.py --sweep` leaves it: one run per (set, setting), each with
    masks/<set>.safetensors, and summary.json. Returns the folder and {(set, group): masks}."""
    model, tokenizer = load_model(model_name)
    sweep = Sweep(name="wanda", notebook="04_domain_submodels",
                  grid=[{"calibration_sets": [[s] for s in SETS], **{k: [v] for k, v in setting.items()}}
                        for setting in SETTINGS],
                  summary=SummarySpec(weight_view_pairs=(("math_instruct", "math_orca"),),
                                      weight_view_triples=(("math_instruct", "math_orca", "python_alpaca"),)))
    folder = root / "figures" / "sweeps" / "wanda"
    points, jobs, results, kept = sweep.points(), [], [], {}
    for run_id, point in zip(sweep.run_ids(), points, strict=True):
        (name,) = point["calibration_sets"]
        setting = {k: v for k, v in point.items() if k != "calibration_sets"}
        masks = _prune(model, tokenizer, SETS[name], setting)
        pruning.save_masks(masks, folder / run_id / "masks" / f"{name}.safetensors", model)
        kept[(name, group_of(setting))] = masks
        parameters = {"profile": "smoke", "model_name": model_name, "seed": 0, "dtype": None,
                      "weight_view_layer": None, **point, "figures_dir": "x"}
        jobs.append(runner.Job(notebook=Path("04_domain_submodels.py"), parameters=parameters,
                               output_path=root / run_id / "x.ipynb", staging_dir=root / "s",
                               publish_dir=folder / run_id, run_id=run_id))
        results.append(JobResult(run_id, "ok", 1.0, []))
    write_sweep_summary(folder, sweep, "smoke", "local", jobs, points, results)
    return folder, kept


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep folder for the module (pruning and saving 6 mask sets takes seconds); tests that change it
    work on a copy (`copy_of`)."""
    return make_sweep_folder(tmp_path_factory.mktemp("sweep"))


def copy_of(swept, tmp_path: Path) -> Path:
    folder = tmp_path / "wanda"
    shutil.copytree(swept[0], folder)
    return folder


def test_mask_overlap_matches_pairwise_jaccard_per_setting(swept, tmp_path):
    folder, kept = copy_of(swept, tmp_path), swept[1]
    result = run_summary(folder)
    out = folder / "summary"
    pairs = pd.read_csv(out / "same_vs_cross_domain.csv")
    assert set(pairs.group) == {"pattern-unstructured_sparsity-0.5", "pattern-2-4"}
    for group, rows in pairs.groupby("group"):
        masks = {name: m for (name, g), m in kept.items() if g == group}
        expected = pruning.pairwise_jaccard(masks)
        expected = expected[expected.level == "model"].set_index(["a", "b"]).jaccard
        for row in rows.itertuples():
            key = (row.a, row.b) if (row.a, row.b) in expected.index else (row.b, row.a)
            assert row.jaccard == pytest.approx(expected[key])
            assert row.same_domain == ({row.a, row.b} == {"math_instruct", "math_orca"})
            assert 0 < row.baseline < row.jaccard <= 1  # Wanda masks of one model overlap beyond chance
        matrix = pd.read_csv(out / f"jaccard_{group}.csv").set_index("calibration")
        assert list(matrix.index) == ["python_alpaca", "math_instruct", "math_orca"]  # ordered by domain
        assert all(matrix.loc[n, n] == 1 for n in matrix.index)
    overlap = json.loads((out / "mask_overlap.json").read_text())
    assert [g["same_domain_pairs"] for g in overlap["groups"]] == [1, 1]
    assert [g["cross_domain_pairs"] for g in overlap["groups"]] == [2, 2]
    assert overlap["runs"] == 6 and overlap["model_name"] == "tiny-llama"
    views = [f for f in result.files if f.startswith("weight_views_") and f.endswith(".png")]
    assert len(views) == 2 and all((out / f).is_file() for f in views)
    view = pd.read_csv(out / "weight_views_pattern-2-4_math_instruct_vs_math_orca.csv")
    model, _ = load_model("tiny-llama")
    q_proj = f"model.layers.{model.config.num_hidden_layers // 2}.self_attn.q_proj"  # notebook 04's default
    masks = (kept[("math_instruct", "pattern-2-4")][q_proj], kept[("math_orca", "pattern-2-4")][q_proj])
    assert view.weights.tolist() == [int((~masks[0] & ~masks[1]).sum()), int((masks[0] & ~masks[1]).sum()),
                                     int((~masks[0] & masks[1]).sum()), int((masks[0] & masks[1]).sum())]
    assert any("same-domain" in line and "cross-domain" in line for line in result.lines)
    # the three-way view: every weight of the q projection in one of the 8 patterns, counted brute force
    for group in ("pattern-unstructured_sparsity-0.5", "pattern-2-4"):
        three = pd.read_csv(out / f"three_way_{group}_math_instruct_math_orca_python_alpaca.csv")
        a, b, c = (kept[(name, group)][q_proj] for name in ("math_instruct", "math_orca", "python_alpaca"))
        for row in three.itertuples():
            want = [(row.code >> i) & 1 for i in range(3)]
            expected = ((a == bool(want[0])) & (b == bool(want[1])) & (c == bool(want[2]))).sum()
            assert row.weights == int(expected)
        assert three.weights.sum() == a.numel() and three.pruned_in[7] == "math_instruct, math_orca, python_alpaca"
        assert (out / f"three_way_{group}_math_instruct_math_orca_python_alpaca.png").is_file()


def test_the_summary_assembles_seed_002s_domain_table_over_the_runs(swept, tmp_path):
    folder = copy_of(swept, tmp_path)
    payload = json.loads((folder / "summary.json").read_text())
    scores = {"math_instruct": 0.30, "math_orca": 0.20, "python_alpaca": 0.10}
    runs = [run for run in payload["runs"] if run["status"] == "ok"]
    for run in runs[1:]:  # the first run wrote no table (as if notebook 04 failed after saving its masks)
        (name,) = run["parameters"]["calibration_sets"]
        pd.DataFrame([{"calibration": "dense", "domain": "dense", "ppl_code": 4.0, "gsm8k_em": 0.5,
                       "zs_boolq": 0.7, "zs_hellaswag": 0.3},
                      {"calibration": name, "domain": "math", "ppl_code": 5.0, "gsm8k_em": scores[name],
                       "zs_boolq": 0.6, "zs_hellaswag": 0.2}]).to_csv(folder / run["run_id"] / "04_domain_table.csv",
                                                                      index=False)
    result = run_summary(folder)
    assert any(f"no 04_domain_table.csv in run(s) {runs[0]['run_id']}" in line for line in result.lines)
    for group in ("pattern-unstructured_sparsity-0.5", "pattern-2-4"):
        table = pd.read_csv(folder / "summary" / f"domain_table_{group}.csv")
        means = pd.read_csv(folder / "summary" / f"domain_means_{group}.csv").set_index("calibration")
        assert table.calibration.iloc[0] == "dense" and (table.calibration == "dense").sum() == 1
        assert means.loc["dense", "commonsense"] == pytest.approx(0.5)  # (0.7 + 0.3) / 2
        for name in table.calibration.iloc[1:]:
            assert means.loc[name, "math"] == pytest.approx(scores[name])
            assert means.loc[name, "commonsense"] == pytest.approx(0.4)
    rows = sum(len(pd.read_csv(folder / "summary" / f"domain_table_{g}.csv")) - 1
               for g in ("pattern-unstructured_sparsity-0.5", "pattern-2-4"))
    assert rows == len(runs) - 1  # every run that wrote a table, once


def test_failed_runs_are_left_out_and_lone_sets_skipped(swept, tmp_path, capsys):
    folder = copy_of(swept, tmp_path)
    payload = json.loads((folder / "summary.json").read_text())
    payload["runs"][0].update(status="failed", error="boom")  # math_instruct, unstructured 50%
    (folder / "summary.json").write_text(json.dumps(payload))
    assert main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "5 ok run(s) (1 not ok, left out)" in out
    assert "weight view math_instruct / math_orca skipped: no ok run saved math_instruct" in out


def test_masks_of_another_model_are_refused(swept, tmp_path, capsys):
    folder = copy_of(swept, tmp_path)
    model, _ = load_model("tiny-llama")
    other = {n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in model.named_modules()
             if n.endswith("q_proj")}
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # another checkpoint of the same shapes: another fingerprint
    run_id = next(p.name for p in folder.iterdir() if p.name.startswith("001"))
    (name,) = [p for p in (folder / run_id / "masks").glob("*.safetensors")]
    pruning.save_masks(other, name, model)
    assert main([str(folder)]) == 1
    assert "computed on another model" in capsys.readouterr().err


def test_missing_masks_and_missing_summary_say_what_to_do(swept, tmp_path):
    folder = copy_of(swept, tmp_path)
    run_id = next(p.name for p in folder.iterdir() if p.name.startswith("002"))
    for file in (folder / run_id / "masks").iterdir():
        file.unlink()
    with pytest.raises(SummaryError, match="save_submodel_masks: true"):
        run_summary(folder)
    with pytest.raises(SummaryError, match="no readable summary.json"):
        run_summary(tmp_path)


@pytest.mark.parametrize(("summary", "expected"), [
    ("summary: {kind: nope}\n", "summary.kind must be one of mask_overlap"),
    ("summary: {kind: mask_overlap, compare: pattern}\n", "summary.compare must name a swept parameter"),
    ("summary: {kind: mask_overlap, weight_view_pairs: [[a]]}\n", "pairs of two different mask set names"),
    ("summary: {kind: mask_overlap, weight_view_triples: [[a, b, a]]}\n", "three different mask set names"),
    ("summary: {kind: mask_overlap, when: end}\n", "unknown key(s) ['when']"),
])
def test_bad_summary_entries_say_what_is_allowed(tmp_path, summary, expected):
    path = tmp_path / "bad.yaml"
    path.write_text("notebook: 04\ngrid: {calibration_sets: [[a]], sparsity: [0.5]}\n" + summary)
    with pytest.raises(SweepError) as error:
        load_sweep(path)
    assert expected in str(error.value) and "bad.yaml" in str(error.value)


def test_the_wanda_sweep_declares_the_mask_summary_and_its_runs_save_masks():
    sweep = load_sweep(runner.REPO_ROOT / "sweeps" / "wanda_calibration_sets.yaml")
    assert sweep.summary == SummarySpec("mask_overlap", "calibration_sets",
                                        (("math_orca", "math_qa"), ("math_orca", "opus_books")),
                                        (("math_qa", "math_orca", "opus_books"),))
    assert sweep.parameters == {"prune_method": "wanda", "save_submodel_masks": True, "compare_submodels": False}
    names = {name for point in sweep.points() for name in point["calibration_sets"]}
    assert {name for pair in sweep.summary.weight_view_pairs for name in pair} <= names
    assert sweep.summary.weight_view_triples == (("math_qa", "math_orca", "opus_books"),)
    jobs, _ = runner.build_sweep_jobs(sweep, runner.discover_notebooks(runner.REPO_ROOT / "notebooks"),
                                      "paper-standins", Path("/tmp/unused"))
    assert len(jobs) == 52 and all(job.parameters["prune_method"] == "wanda" for job in jobs)


# A stand-in for notebook 04 in a sweep: prunes tiny-llama on its swept calibration set and saves the masks
# where notebook 04 does (figures_dir/masks/<set>.safetensors).
PRUNING_NOTEBOOK = """\
# %% tags=["parameters"]
profile = "unset"
model_name = "unset"
seed = 0
figures_dir = "unset"
calibration_sets = ["arithmetic"]
sparsity = 0.5

# %%
from pathlib import Path
import matplotlib.pyplot as plt
from effllm import data, plots, pruning
from effllm.models import load_model
model, tokenizer = load_model(model_name)
(name,) = calibration_sets
ids = data.calibration(name, tokenizer, n_samples=2, seq_len=16, split="train")
masks = pruning.prune(model, "wanda", sparsity, calibration=ids)
pruning.save_masks(masks, Path(figures_dir) / "masks" / f"{name}.safetensors", model)
fig, ax = plt.subplots()
plots.save_figure(fig, "done", out_dir=figures_dir)
"""


@pytest.mark.notebook
def test_run_all_sweep_runs_the_declared_summary_at_the_end(tmp_path, capsys):
    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    (notebooks / "04_prune.py").write_text(PRUNING_NOTEBOOK)
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(textwrap.dedent("""\
        name: masks
        notebook: 04_prune
        profile: smoke
        grid: {calibration_sets: [[arithmetic], [python-code]], sparsity: [0.5]}
        summary: {kind: mask_overlap, weight_view_pairs: [[arithmetic, python-code]]}
        """))
    build = tmp_path / "build"
    code = cli.main(["--sweep", str(sweep_file), "--notebooks-dir", str(notebooks), "--build-dir", str(build),
                     "--jobs", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    folder = build / "smoke" / "figures" / "sweeps" / "masks"
    assert "summary step mask_overlap over 2 ok run(s)" in out and f"python -m effllm.runner.summaries {folder}" in out
    assert json.loads((folder / "summary.json").read_text())["summary_step"]["kind"] == "mask_overlap"
    pairs = pd.read_csv(folder / "summary" / "same_vs_cross_domain.csv")
    assert len(pairs) == 1 and not pairs.same_domain[0] and 1 / 3 < pairs.jaccard[0] < 1
    assert (folder / "summary" / "weight_views_sparsity-0.5_arithmetic_vs_python-code.png").is_file()


# --------------------------------------------------------------------------------------------------
# The analysis itself (effllm.experiments.masks), on hand-made masks


def test_compare_mask_sets_orders_by_domain_and_averages_same_and_cross_pairs():
    from effllm.experiments.masks import MaskComparisonError, calibration_domain, compare_mask_sets

    def mask(*pruned):  # one linear of 4 weights
        return {"layers.0.q": torch.tensor([i in pruned for i in range(4)])}

    masks = {"python-code": mask(0, 1), "math_orca": mask(0, 2), "orca_math": mask(0, 3), "humaneval": mask(1)}
    assert [calibration_domain(name) for name in masks] == ["code", "math", "math", "code"]
    assert calibration_domain("no-such-set") == "other"
    overlap = compare_mask_sets(masks, "g")
    assert list(overlap.masks) == ["python-code", "humaneval", "math_orca", "orca_math"]  # code, then math
    assert list(overlap.matrix.index) == list(overlap.masks)
    # same-domain pairs: {0,1}/{1} = 1/2 and {0,2}/{0,3} = 1/3; cross: {0,1}/{0,2} 1/3, {0,1}/{0,3} 1/3,
    # {1}/{0,2} 0, {1}/{0,3} 0
    assert overlap.row["same_domain_pairs"] == 2 and overlap.row["cross_domain_pairs"] == 4
    assert overlap.row["same_domain_jaccard"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert overlap.row["cross_domain_jaccard"] == pytest.approx((1 / 3 + 1 / 3) / 4)
    density = {"python-code": 0.5, "humaneval": 0.25, "math_orca": 0.5, "orca_math": 0.5}
    expected = [pruning.random_mask_jaccard(density[a], density[b]) for a, b in zip(overlap.pairs.a,
                                                                                    overlap.pairs.b, strict=True)]
    assert overlap.pairs.baseline.tolist() == pytest.approx(expected)
    assert (overlap.pairwise.group == "g").all()
    with pytest.raises(MaskComparisonError, match="needs two mask sets; got python-code"):
        compare_mask_sets({"python-code": mask(0)}, "g")
