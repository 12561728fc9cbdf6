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
    # the middle budget of the sorted labels "10/30", "15/30", "5/30" is "15/30"
    assert claim.measured == pytest.approx((pivot["skipping 15/30"] - pivot["early exit 15/30"]).mean())
    assert claim.verdict == claims.HOLDS and claim.n == 40


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


def test_update_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{claims.README_BEGIN}\nold\n{claims.README_END}\noutro\n")
    table = claims.build_claims(tmp_path)
    assert claims.update_readme(readme, table)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert not claims.update_readme(readme, table)  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no claims block"):
        claims.update_readme(readme, table)
