"""The claims report: verdicts against their bars, claims computed from tables on known cases, and the README
block regenerated from the committed tables."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from effllm.experiments import claims, readme
from effllm.paths import REPO_ROOT


def test_verdicts_compare_the_whole_interval_with_the_bar():
    assert claims.verdict_above(0.1, 0.3, 0.0) == claims.HOLDS
    assert claims.verdict_above(-0.3, -0.1, 0.0) == claims.FAILS
    assert claims.verdict_above(-0.1, 0.3, 0.0) == claims.UNDECIDED
    assert claims.verdict_below(-0.3, -0.1, 0.0) == claims.HOLDS
    assert claims.verdict_below(0.1, 0.3, 0.0) == claims.FAILS
    assert claims.verdict_above(math.nan, 0.3, 0.0) == claims.UNDECIDED


def test_n_to_decide_scales_with_the_squared_ratio_of_half_width_to_distance():
    claim = claims.Claim("003", "x", "y", measured=0.1, ci_low=-0.1, ci_high=0.3, n=40, bar=0.0).decide(above=True)
    assert claim.verdict == claims.UNDECIDED
    assert claim.n_to_decide == 160  # half-width 0.2 at distance 0.1: four times the items
    decided = claims.Claim("003", "x", "y", measured=0.2, ci_low=0.1, ci_high=0.3, n=40, bar=0.0).decide(above=True)
    assert decided.verdict == claims.HOLDS and math.isnan(decided.n_to_decide)


def _items(labels_scores, n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for label, (mean, spread) in labels_scores.items():
        for k in range(n):
            rows.append({"label": label, "prompt": k, "rougeL_vs_full": mean + spread * rng.standard_normal()})
    return pd.DataFrame(rows)


def test_skipping_claim_reads_the_paired_items(tmp_path):
    items = _items({"skipping 15/30": (0.6, 0.05), "early exit 15/30": (0.2, 0.05), "skipping 5/30": (0.1, 0.05),
                    "early exit 5/30": (0.1, 0.05), "skipping 10/30": (0.3, 0.05), "early exit 10/30": (0.1, 0.05)})
    items.to_csv(tmp_path / "03_generation_items.csv", index=False)
    claim = claims.skipping_beats_early_exit(tmp_path)
    pivot = items.pivot(index="prompt", columns="label", values="rougeL_vs_full")
    # the budget nearest half the depth: 15/30 (a text sort would put "5/30" after "15/30")
    assert claim.measured == pytest.approx((pivot["skipping 15/30"] - pivot["early exit 15/30"]).mean())
    assert claim.verdict == claims.HOLDS and claim.n == 40
    # four budgets of 24 layers; sorted as text ("12/24", "20/24", "4/24", "8/24") the middle would be 4/24
    items = _items({f"{mode} {n}/24": (0.5 if (mode, n) == ("skipping", 12) else 0.1, 0.05)
                    for mode in ("skipping", "early exit") for n in (4, 8, 12, 20)})
    items.to_csv(tmp_path / "03_generation_items.csv", index=False)
    claim = claims.skipping_beats_early_exit(tmp_path)
    assert "'skipping 12/24' vs 'early exit 12/24'" in claim.source and claim.verdict == claims.HOLDS


def test_oracle_claim_equals_a_brute_force_count(tmp_path):
    rng = np.random.default_rng(1)
    quality = pd.DataFrame({"skipping 8/24": rng.random(4).round(1), "skipping 12/24": rng.random(4).round(1),
                            "full": rng.random(4).round(1)})
    costs = {"skipping 8/24": 8, "skipping 12/24": 12, "full": 24}
    quality.rename_axis("prompt").reset_index().to_csv(tmp_path / "03_oracle_items.csv", index=False)
    pd.DataFrame({"label": list(costs), "layers": list(costs.values())}).to_csv(tmp_path / "03_oracle_costs.csv",
                                                                               index=False)
    claim = claims.oracle_layer_share(tmp_path, bootstrap=200)
    target = quality["full"].mean()
    labels = list(costs)
    expected = min(np.mean([costs[labels[j]] for j in choice]) / 24
                   for choice in itertools.product(range(3), repeat=4)
                   if np.mean([quality.iloc[t][labels[j]] for t, j in enumerate(choice)]) >= target - 1e-12)
    assert claim.measured == pytest.approx(expected)
    assert claim.ci_low <= claim.measured <= claim.ci_high and claim.n == 4


def test_missing_tables_leave_the_claim_undecided_and_say_which(tmp_path):
    table = claims.build_claims(tmp_path)
    assert list(table.columns) == claims.COLUMNS
    assert (table.verdict == claims.UNDECIDED).all()
    assert table.source.str.startswith("missing:").all()
    assert {"000", "001", "002", "003", "004"} <= set(table.seed)


def test_readme_blocks_are_what_the_generator_writes_from_the_committed_files():
    """Every generated table in the README (claims, benchmarks, exit training, run times) comes from results/ and
    figures/: regenerate each block and compare."""
    text = (REPO_ROOT / "README.md").read_text()
    for name in readme.BLOCKS:
        assert f"<!-- {name}:begin" in text, f"README has no generated {name!r} block"
    assert readme.render(text, REPO_ROOT / "results", REPO_ROOT / "figures") == text, (
        "a README block is stale: run `python -m effllm.experiments.readme`")
    begin, end = text.index(claims.README_BEGIN), text.index(claims.README_END) + len(claims.README_END)
    assert text[begin:end] == claims.readme_block(claims.build_claims(REPO_ROOT / "figures"))


def test_run_times_block_names_the_precision_and_cpu_of_its_run(tmp_path):
    import json

    rows = [{"notebook": "00_quickstart", "status": "ok", "seconds": 90.0},
            {"notebook": "01_early_exit", "status": "failed", "seconds": 30.0}]
    precision = {"dtype": "bfloat16", "dtype_setting": "auto", "cpu_bfloat16": True, "cpu_isa": "AVX-512 BF16",
                 "cpu_model": "Some CPU"}
    (tmp_path / readme.RUN_SUMMARY).write_text(json.dumps({"notebooks": rows, "precision": precision,
                                                            "finished": "2026-12-07 07:00 UTC"}))
    block = readme.run_times_block(tmp_path)
    assert block.startswith("Precision **bfloat16** (EFFLLM_DTYPE=auto) on Some CPU (AVX-512 BF16, native bfloat16), "
                            "finished 2026-12-07 07:00 UTC:")
    assert "| 00_quickstart | ok | 1.5 |" in block and "| all | 1 of 2 ok | 2 |" in block
    (tmp_path / readme.RUN_SUMMARY).write_text(json.dumps({"notebooks": rows}))  # an older summary
    assert readme.run_times_block(tmp_path).startswith("Precision and CPU not recorded")


def test_update_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{claims.README_BEGIN}\nstale block\n{claims.README_END}\noutro\n")
    table = claims.build_claims(tmp_path)
    assert claims.update_readme(readme, table)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale block" not in text
    assert not claims.update_readme(readme, table)  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no claims block"):
        claims.update_readme(readme, table)


def _windows(gap_code: float, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """04_domain_windows: code-calibrated sets are `gap_code` nats better on code than the prose sets."""
    rng = np.random.default_rng(seed)
    base = rng.normal(2.0, 0.3, n)  # window difficulty, shared by every sub-model (what pairing removes)
    rows = []
    sets = {"python-code": "code", "humaneval": "code", "python-docs": "prose", "docstrings": "prose",
            "dense": "dense"}
    for name, domain in sets.items():
        offset = {"python-code": -gap_code, "humaneval": -gap_code + 0.02, "dense": -0.5}.get(name, 0.0)
        for w in range(n):
            rows.append({"calibration": name, "calibration_domain": domain, "eval_domain": "code", "window": w,
                         "nll": base[w] + offset + rng.normal(0, 0.005)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("gap", "verdict"), [(0.05, claims.HOLDS), (0.0, claims.UNDECIDED), (-0.05, claims.FAILS)])
def test_in_domain_claim_pairs_the_best_of_each_side_over_windows(gap, verdict):
    (claim,) = claims.in_domain_claims(_windows(gap))
    assert claim.verdict == verdict and claim.n == 40
    # the best in-domain set is python-code (humaneval is 0.02 worse), the best other is one of the prose sets
    assert "'python-code'" in claim.source and claim.measured == pytest.approx(-gap, abs=0.005)
    assert claim.ci_low <= claim.measured <= claim.ci_high


def test_in_domain_claims_read_the_table_from_a_folder(tmp_path):
    assert claims.in_domain_calibration_wins(tmp_path)[0].source == "missing: 04_domain_windows.csv"
    _windows(0.05).to_csv(tmp_path / "04_domain_windows.csv", index=False)
    assert claims.in_domain_calibration_wins(tmp_path)[0].verdict == claims.HOLDS


def _task_items(math_gap: float) -> pd.DataFrame:
    """04_task_items rows: two math benchmarks of different sizes (gsm8k 30 items, arithmetic-mc 10), a code one;
    math_orca is ahead of the best other set by ``math_gap`` on both math benchmarks."""
    rng = np.random.default_rng(3)
    rows = []
    level = {"math_orca": 0.4 + math_gap, "math_qa": 0.35, "python_alpaca": 0.4, "humaneval": 0.1}
    domain = {"math_orca": "math", "math_qa": "math", "python_alpaca": "code", "humaneval": "code"}
    for name, p in level.items():
        for metric, n in (("gsm8k_em", 30), ("zs_arithmetic-mc", 10), ("humaneval_pass@1", 20)):
            for item in range(n):
                rows.append({"calibration": name, "calibration_domain": domain[name], "metric": metric,
                             "item": item, "value": float(rng.random() < p)})
    rows += [{"calibration": "dense", "calibration_domain": "dense", "metric": "gsm8k_em", "item": i, "value": 1.0}
             for i in range(30)]  # dense is not a competitor
    return pd.DataFrame(rows)


def test_in_domain_task_claims_weight_each_benchmark_equally_as_the_seeds_mean():
    items = _task_items(0.3)
    math, code = claims.in_domain_task_claims(items)
    # brute force: each side's domain score is the mean of its benchmark means
    score = items.groupby(["calibration", "metric"]).value.mean()
    def domain_score(name):
        return (score[name, "gsm8k_em"] + score[name, "zs_arithmetic-mc"]) / 2
    others = {n: domain_score(n) for n in ("python_alpaca", "humaneval")}
    best_other = max(others, key=others.get)
    assert math.measured == pytest.approx(domain_score("math_orca") - others[best_other])
    assert f"'{best_other}'" in math.source and "'math_orca'" in math.source and math.n == 40
    assert math.ci_low <= math.measured <= math.ci_high and "math task score" in math.claim
    assert "code task score" in code.claim
    # a sub-model not scored on every benchmark of the domain does not compete
    partial = items[~((items.calibration == "math_orca") & (items.metric == "zs_arithmetic-mc"))]
    claim = claims.in_domain_task_claims(partial)[0]
    assert "'math_qa'" in claim.source and claim.measured < 0.1
    only_math = items[items.calibration_domain.isin(["math", "dense"])]
    assert claims.in_domain_task_claims(only_math)[0].verdict == claims.UNDECIDED
    assert "math needs sub-models of math and of another domain" in claims.in_domain_task_claims(only_math)[0].source


def _pairs(same_gap: float, layers: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    pairs = [("python-code", "humaneval", True), ("python-docs", "docstrings", True), ("python-code", "python-docs",
                                                                                         False),
             ("humaneval", "docstrings", False), ("python-code", "self-generated", False)]
    for layer in range(layers):
        level = rng.uniform(0.5, 0.7)
        for a, b, same in pairs:
            rows.append({"set_a": a, "set_b": b, "layer": layer, "same_domain": same,
                         "jaccard": level + (same_gap if same else 0) + rng.normal(0, 0.002)})
    return pd.DataFrame(rows)


def test_same_domain_claim_resamples_pairs_not_layers(tmp_path):
    assert claims.same_domain_claim(_pairs(0.03)).verdict == claims.HOLDS
    assert claims.same_domain_claim(_pairs(-0.03)).verdict == claims.FAILS
    claim = claims.same_domain_claim(_pairs(0.03))
    # 2 same-domain and 3 cross-domain pairs: n counts pairs, whatever the number of layers
    assert claim.n == 5 and claims.same_domain_claim(_pairs(0.03, layers=30)).n == 5
    assert claim.measured == pytest.approx(0.03, abs=0.003) and "2 same-domain and 3 cross-domain" in claim.source
    # the statistic by hand: each pair's mean over layers, then the difference of the two groups' means
    per_pair = _pairs(0.03).groupby(["set_a", "set_b", "same_domain"]).jaccard.mean().reset_index()
    by_hand = per_pair[per_pair.same_domain].jaccard.mean() - per_pair[~per_pair.same_domain].jaccard.mean()
    assert claim.measured == pytest.approx(by_hand)
    _pairs(0.03).to_csv(tmp_path / "04_jaccard_pairs.csv", index=False)  # same_domain read back as text
    assert claims.same_domain_masks_more_alike(tmp_path).verdict == claims.HOLDS
    only_cross = _pairs(0.03)
    assert "within and across" in claims.same_domain_claim(only_cross[~only_cross.same_domain]).source


def test_same_domain_claim_with_one_pair_per_side_is_undecided():
    pairs = _pairs(0.03)
    pairs = pairs[pairs.set_b.isin(["humaneval", "python-docs"]) & (pairs.set_a == "python-code")]
    claim = claims.same_domain_claim(pairs)
    assert claim.n == 2 and claim.verdict == claims.UNDECIDED  # one unit a side has no spread to resample


def _slicing_windows(gap_mean: float, gap_parameters: float, n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    base = rng.normal(3.0, 0.2, n)
    rows = []
    for level in (0.2, 0.3):
        for matched, gap in (("mean", gap_mean), ("parameters", gap_parameters)):
            for variant in ("constant", "dynamic"):
                for w in range(n):
                    nll = base[w] + level + (-gap if variant == "dynamic" else 0) + rng.normal(0, 0.003)
                    rows.append({"level": level, "matched": matched, "variant": variant, "window": w, "nll": nll,
                                 "parameters": 100})
    return pd.DataFrame(rows)


def test_dynamic_beats_constant_per_level_and_matching(tmp_path):
    _slicing_windows(0.05, 0.0).to_csv(tmp_path / "06_slicing_windows.csv", index=False)
    by_mean = claims.dynamic_beats_constant(tmp_path, "mean")
    by_parameters = claims.dynamic_beats_constant(tmp_path, "parameters")
    assert [c.verdict for c in by_mean] == [claims.HOLDS, claims.HOLDS]
    assert [c.verdict for c in by_parameters] == [claims.UNDECIDED, claims.UNDECIDED]
    assert all(c.n == 30 for c in by_mean) and "equal parameter count" in by_parameters[0].claim


def test_dynamic_against_shortgpt_where_it_removes_layers(tmp_path):
    windows = _slicing_windows(0.05, 0.0)
    assert claims.dynamic_beats_shortgpt(tmp_path)[0].source.startswith("missing: 06_slicing_windows")
    windows.to_csv(tmp_path / "06_slicing_windows.csv", index=False)
    assert "no ShortGPT rows" in claims.dynamic_beats_shortgpt(tmp_path)[0].source
    dynamic = windows[(windows.level == 0.3) & (windows.variant == "dynamic") & (windows.matched == "mean")]
    shortgpt = dynamic.assign(variant="shortgpt", matched="parameters", nll=dynamic.nll + 0.4, parameters=90)
    pd.concat([windows, shortgpt]).to_csv(tmp_path / "06_slicing_windows.csv", index=False)
    (claim,) = claims.dynamic_beats_shortgpt(tmp_path)  # only M = 0.3 has ShortGPT rows
    assert "M = 0.3" in claim.claim and claim.verdict == claims.HOLDS and claim.n == 30
    assert claim.measured == pytest.approx(-0.4) and "90 parameters" in claim.source


def test_dynamic_magnitudes_at_the_best_level(tmp_path):
    # dynamic 0.05 lower log-perplexity at every level: a 4.9% lower perplexity, short of the paper's 7%
    _slicing_windows(0.05, 0.0).to_csv(tmp_path / "06_slicing_windows.csv", index=False)
    perplexity, accuracy = claims.dynamic_magnitudes(tmp_path)
    assert perplexity.measured == pytest.approx(math.expm1(-0.05), abs=2e-3)
    assert perplexity.verdict == claims.FAILS and perplexity.bar == -0.07
    assert accuracy.source.startswith("missing: 06_zero_shot_items")
    _slicing_windows(0.12, 0.0).to_csv(tmp_path / "06_slicing_windows.csv", index=False)
    assert claims.dynamic_magnitudes(tmp_path)[0].verdict == claims.HOLDS


def test_dynamic_accuracy_pairs_items_at_each_level(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for item in range(300):
        right = int(rng.random() < 0.7)
        rows.append({"level": 0.0, "variant": "dense", "task": "prose-mc", "item": f"prose-mc/{item}",
                     "correct": right})
        rows.append({"level": 0.3, "variant": "constant", "task": "prose-mc", "item": f"prose-mc/{item}",
                     "correct": right})
        rows.append({"level": 0.3, "variant": "dynamic", "task": "prose-mc", "item": f"prose-mc/{item}",
                     "correct": 1 if item % 5 == 0 else right})  # dynamic gets every fifth item right
    pd.DataFrame(rows).to_csv(tmp_path / "06_zero_shot_items.csv", index=False)
    (claim,) = claims.dynamic_accuracy(tmp_path)
    assert "M = 0.3" in claim.claim and claim.n == 300 and claim.measured > 0 and claim.verdict == claims.HOLDS


def test_sparse_claims_per_projection_group_are_undecided_without_a_2_4_kernel(tmp_path):
    kinds = ["q", "k", "v", "o", "up", "gate", "down"]
    table = pd.DataFrame({"shapes": "CodeLlama-13B (shapes)", "kind": kinds * 2, "tokens": [1] * 7 + [16] * 7,
                          "format": "csr", "speedup": 0.5, "speedup_min": 0.4, "speedup_max": 0.6, "rounds": 5,
                          "device": "CPU"})
    table.to_csv(tmp_path / "05_projection_speedup.csv", index=False)
    made = claims.sparse_2_4_speedup(tmp_path)
    assert [c.claim.split("13B's ")[1].split(" ")[0] for c in made] == ["q/k/v/o", "up/gate", "down"]
    assert all(c.verdict == claims.UNDECIDED and "csr only" in c.source for c in made)
    assert [c.original.split(" ")[-1] for c in made] == ["1.36x", "1.01x", "1.20x"]  # the seed's table
    table["format"] = "semi-structured"
    table[["speedup", "speedup_min", "speedup_max"]] = [1.2, 1.1, 1.3]
    table.loc[table.kind == "down", ["speedup", "speedup_min", "speedup_max"]] = [0.9, 0.8, 0.95]
    table.loc[(table.kind == "k") & (table.tokens == 16), ["speedup", "speedup_min", "speedup_max"]] = [1.15, 1.05, 1.2]
    table.loc[(table.kind == "q") & (table.tokens == 16), ["speedup", "speedup_min", "speedup_max"]] = [1.5, 1.4, 1.6]
    table.to_csv(tmp_path / "05_projection_speedup.csv", index=False)
    attention, mlp_in, down = claims.sparse_2_4_speedup(tmp_path)
    # the group's slowest projection at the most tokens: k at 16 tokens (q is faster there, every 1-token row too)
    assert attention.measured == 1.15 and "(k, the slowest of k/o/q/v, 16 tokens" in attention.source
    assert attention.verdict == claims.HOLDS and attention.n == 5
    assert down.verdict == claims.FAILS and mlp_in.verdict == claims.HOLDS


def test_build_claims_on_an_empty_folder_is_all_undecided(tmp_path):
    table = claims.build_claims(tmp_path)
    assert list(table.columns) == claims.COLUMNS
    assert (table.verdict == claims.UNDECIDED).all() and table.source.str.startswith("missing").all()


def test_markdown_says_the_n_that_would_decide_an_undecided_claim():
    undecided = claims.Claim("003", "x", "y", measured=0.1, ci_low=-0.1, ci_high=0.3, n=40, bar=0.0).decide(above=True)
    decided = claims.Claim("004", "z", "w", measured=0.2, ci_low=0.1, ci_high=0.3, n=40, bar=0.0).decide(above=True)
    table = pd.DataFrame([vars(undecided), vars(decided)], columns=claims.COLUMNS)
    lines = claims.markdown(table).splitlines()
    assert lines[0].endswith("| n that would decide it |")
    assert lines[2].endswith("| **undecided at this n** | ~160 |") and lines[3].endswith("| **holds** |  |")


def test_a_bar_above_the_ceiling_cannot_hold_whatever_was_measured():
    """An interval above the bar with the bar above the physical ceiling is a measurement error, not a holds."""
    claim = claims.Claim("001", "x", "y", measured=1.8, ci_low=1.75, ci_high=1.85, n=8, bar=1.7, ceiling=1.36)
    assert claim.decide(above=True).verdict == claims.CANNOT
    reachable = claims.Claim("001", "x", "y", measured=1.2, ci_low=1.1, ci_high=1.3, n=8, bar=1.0, ceiling=1.36)
    assert reachable.decide(above=True).verdict == claims.HOLDS
    line = claims.markdown(pd.DataFrame([vars(claim)], columns=claims.COLUMNS)).splitlines()[2]
    assert "**cannot hold on this model** (ceiling 1.36x, bar 1.7x)" in line


def _free_rows(ceiling_at_20: float) -> pd.DataFrame:
    return pd.DataFrame({
        "label": ["hf_generate", "full", "free@20 0.9"], "method": ["hf", "full", "free"],
        "exits": [claims.TRAINED] * 3, "rougeL_vs_full_ci_low": [1.0, 1.0, 0.95],
        "rougeL_vs_full": [1.0, 1.0, 0.97], "n_prompts": [102] * 3, "n_speed_prompts": [8] * 3,
        "speedup_vs_hf": [1.0, 1.0, 1.2], "speedup_vs_hf_ci_low": [1.0, 1.0, 1.15],
        "speedup_vs_hf_ci_high": [1.0, 1.0, 1.25], "speedup_ceiling": [1.0, 1.0, ceiling_at_20]})


def test_free_speedup_reads_the_ceiling_of_its_best_setting(tmp_path):
    _free_rows(1.36).to_csv(tmp_path / "08_speed_quality.csv", index=False)
    claim = claims.free_speedup(tmp_path)
    assert claim.verdict == claims.CANNOT and claim.ceiling == 1.36 and claim.measured == 1.2
    _free_rows(2.1).to_csv(tmp_path / "08_speed_quality.csv", index=False)
    assert claims.free_speedup(tmp_path).verdict == claims.FAILS  # reachable, and the interval is below the bar


def test_vocabulary_claims_have_one_row_per_model(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for model, loss in (("a", 0.0), ("b", -0.2)):
        for prompt in range(40):
            base = rng.uniform(0.5, 1.0)
            reference = rng.uniform(0.2, 0.4)
            rows.append({"model": model, "label": "none", "prompt": prompt, "rougeL_vs_full": base,
                         "rougeL_vs_reference": reference})
            rows.append({"model": model, "label": "fixed k=256", "prompt": prompt,
                         "rougeL_vs_full": base + loss + rng.normal(0, 0.01),
                         "rougeL_vs_reference": reference + loss / 10 + rng.normal(0, 0.001)})
    pd.DataFrame(rows).to_csv(tmp_path / "02_generation_items.csv", index=False)
    made = claims.vocab_pruning_keeps_quality(tmp_path)
    assert [c.verdict for c in made] == [claims.HOLDS, claims.FAILS]
    assert "on a " in made[0].claim and "on b " in made[1].claim and all(c.n == 40 for c in made)
    # the seed's metric and bar: ROUGE-L vs references within ~1 point (model b loses 2 points)
    seed_metric = claims.vocab_pruning_keeps_reference_quality(tmp_path)
    assert [c.verdict for c in seed_metric] == [claims.HOLDS, claims.FAILS] and seed_metric[0].bar == -0.01


def _rows(labels: dict[str, tuple[float, float]], n: int = 40, column: str = "rougeL_vs_reference",
           seed: int = 5) -> pd.DataFrame:
    """Per-prompt rows: label -> (mean of ``column``, avg_layers), a shared per-prompt level plus small noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.4, n)
    rows = []
    for label, (mean, layers) in labels.items():
        method = label.split(" ")[0].lower()
        for prompt in range(n):
            rows.append({"label": label, "method": method, "prompt": prompt, "avg_layers": layers,
                         column: max(0.0, base[prompt] * mean / 0.3 + rng.normal(0, 0.005))})
    return pd.DataFrame(rows)


def test_early_exit_reference_share_per_budget_of_the_seed(tmp_path):
    items = _rows({"full": (0.3, 30), "early exit 5/30": (0.27, 5), "early exit 10/30": (0.15, 10)})
    items.to_csv(tmp_path / "03_generation_items.csv", index=False)
    quarter, third, half = claims.early_exit_reference_share(tmp_path)
    assert quarter.verdict == claims.HOLDS and quarter.measured == pytest.approx(0.9, abs=0.02)  # bar 0.249/0.342
    assert quarter.bar == pytest.approx(0.249 / 0.342) and quarter.n == 40
    assert third.verdict == claims.FAILS and third.measured == pytest.approx(0.5, abs=0.02)
    assert half.verdict == claims.UNDECIDED and "no early-exit budget at 0.5" in half.source


def test_controllers_are_compared_by_their_gain_over_random_at_their_budget(tmp_path):
    assert claims.controllers_barely_beat_fixed(tmp_path).source == "missing: 03_controller_items.csv"
    labels = {"controller (hidden state)": (0.20, 12), "random at hidden state budget": (0.15, 12),
              "controller (fixed input)": (0.30, 20), "random at fixed input budget": (0.25, 20)}
    _rows(labels).to_csv(tmp_path / "03_controller_items.csv", index=False)
    claim = claims.controllers_barely_beat_fixed(tmp_path)
    # raw scores differ by -0.10, but both gain 0.05 over random at their budget: the difference of gains is ~0
    assert claim.measured == pytest.approx(0.0, abs=0.01) and claim.verdict == claims.HOLDS and claim.n == 40
    labels["controller (hidden state)"] = (0.40, 12)  # a gain of 0.25 over random: more than barely
    _rows(labels).to_csv(tmp_path / "03_controller_items.csv", index=False)
    assert claims.controllers_barely_beat_fixed(tmp_path).verdict == claims.FAILS


def test_adaptive_threshold_is_compared_with_the_fixed_one_nearest_in_layers(tmp_path):
    labels = {"FREE 0.9": (0.9, 24), "FREE 0.7": (0.5, 21), "FREE adaptive": (0.88, 23.5),
              "FREE 0.7 + rollback": (0.95, 22)}
    trained = _rows(labels, column="rougeL_vs_full").assign(exits=claims.TRAINED)
    # notebook 08's fitted-exit ("before") rows are left out: here their adaptive row would fail the bar
    before = _rows({"FREE 0.9": (0.9, 24), "FREE adaptive": (0.2, 23.5)}, column="rougeL_vs_full")
    pd.concat([trained, before.assign(exits="before: fitted linear")]).to_csv(
        tmp_path / "08_generation_items.csv", index=False)
    claim = claims.adaptive_matches_fixed(tmp_path)
    assert "'FREE adaptive' at 23.5 layers/token vs 'FREE 0.9' at 24.0" in claim.source
    assert claim.verdict == claims.HOLDS and claim.measured == pytest.approx(-0.02, abs=0.01)
    assert claim.n == 40 and "08_generation_items" in claim.source
    _rows(labels, column="rougeL_vs_full").to_csv(tmp_path / "01_generation_items.csv", index=False)  # 01's fitted exits
    assert claims.adaptive_matches_fixed(tmp_path, "01_generation_items").verdict == claims.HOLDS


def _speed_quality(calm_speed: tuple[float, float, float], free_speed: tuple[float, float, float]) -> pd.DataFrame:
    rows = []
    for label, method, speed in (("CALM 0.9", "calm", calm_speed), ("FREE 0.9", "free", free_speed)):
        rows.append({"exits": claims.TRAINED, "label": label, "method": method, "rougeL_vs_full": 0.97,
                     "rougeL_vs_full_ci_low": 0.95, "avg_layers": 20.0, "speedup_vs_hf": speed[0],
                     "speedup_vs_hf_ci_low": speed[1], "speedup_vs_hf_ci_high": speed[2], "n_speed_prompts": 8,
                     "n_prompts": 40})
    return pd.DataFrame(rows)


def test_calm_no_real_speedup_and_free_reference_share(tmp_path):
    _speed_quality((0.8, 0.75, 0.85), (1.2, 1.1, 1.3)).to_csv(tmp_path / "08_speed_quality.csv", index=False)
    calm = claims.calm_no_real_speedup(tmp_path)
    assert calm.verdict == claims.HOLDS and calm.measured == 0.8 and "'CALM 0.9'" in calm.source
    _speed_quality((1.3, 1.2, 1.4), (1.2, 1.1, 1.3)).to_csv(tmp_path / "08_speed_quality.csv", index=False)
    assert claims.calm_no_real_speedup(tmp_path).verdict == claims.FAILS
    items = _rows({"full": (0.3, 30), "FREE 0.9": (0.3 * 0.995, 20)}).assign(exits=claims.TRAINED)
    before = items.assign(exits="before: fitted linear", rougeL_vs_reference=0.0)  # not read: the trained rows are
    pd.concat([items, before]).to_csv(tmp_path / "08_generation_items.csv", index=False)
    free = claims.free_keeps_reference_quality(tmp_path)
    assert free.measured == pytest.approx(0.995, abs=0.01) and free.n == 40 and free.bar == 0.99


def test_vocab_check_flops_ratio_is_paired_over_prompts(tmp_path):
    rows = [{"model": "m", "label": label, "prompt": p, "confidence_flops_per_token": flops * (1 + p / 10)}
            for label, flops in (("none", 1e6), ("fixed k=256", 1e5)) for p in range(10)]
    pd.DataFrame(rows).to_csv(tmp_path / "02_generation_items.csv", index=False)
    (claim,) = claims.vocab_pruning_cuts_check_flops(tmp_path)
    assert claim.measured == pytest.approx(0.1) and claim.verdict == claims.HOLDS and claim.n == 10
