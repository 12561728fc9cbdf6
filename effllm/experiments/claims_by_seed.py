"""The claims of the decoding seeds (000 vocabulary pruning, 001 early exit, 003 layer selection) for the claims report
(:mod:`effllm.experiments.claims` runs them; seeds 002 and 004 are in :mod:`effllm.experiments.claims_compression`):
each reads the notebook tables it needs from a figures folder and returns a decided :class:`Claim` (or several),
or an undecided one naming the missing table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from effllm.experiments.stats import paired_ratio_ci, paired_speedup
from effllm.experiments.verdicts import (
    FAILS,
    QUALITY_TOLERANCE,
    Claim,
    missing_tables,
    paired_difference,
    read_table,
)

# ---- seed 000: vocabulary pruning ---------------------------------------------------------------------


def _fixed_256(labels) -> str | None:
    return next((label for label in labels if label.startswith("fixed") and "256" in label), None)


def _per_model(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The table's rows model by model (in table order); one unnamed group for a table without a model column."""
    if "model" not in table:
        return [("", table)]
    return [(str(model), table[table.model == model]) for model in table.model.unique()]


def _each_model(folder: Path, table: str, claim: Any, measure: Any) -> list[Claim]:
    """``claim(model)`` for each model of notebook 02's ``table``, measured by ``measure(claim, rows, pruned, model)``
    on that model's rows with its fixed k = 256 label (the seed's claims are about each model it prunes)."""
    found = read_table(folder, table)
    if found is None:
        return [missing_tables(claim(), table)]
    made = []
    for model, rows in _per_model(found):
        pruned = _fixed_256(rows.label.unique())
        made.append(missing_tables(claim(model), f"{table} (no fixed k=256 row)") if pruned is None
                    else measure(claim(model), rows, pruned, model))
    return made


def _on(model: str) -> str:
    return f" on {model}" if model else ""


def vocab_pruning_keeps_quality(folder: Path) -> list[Claim]:
    def claim(model: str = "") -> Claim:
        return Claim("000", f"CALM with the exit check pruned to the top-k candidates keeps the output of CALM without "
                            f"pruning{_on(model)} (ROUGE-L vs full depth, pruned minus unpruned, above -0.05)",
                     "T5-large SQuAD / SAMSum: quality within ~1 point of unpruned CALM at k = 256")

    def measure(one: Claim, rows: pd.DataFrame, pruned: str, model: str) -> Claim:
        one.measured, one.ci_low, one.ci_high, one.n = paired_difference(rows, pruned, "none", "rougeL_vs_full")
        one.bar = -QUALITY_TOLERANCE
        one.source = f"02_generation_items.csv ({model}, '{pruned}' vs 'none', paired over prompts)"
        return one.decide(above=True)

    return _each_model(folder, "02_generation_items", claim, measure)


SEED_000_POINTS = 0.01  # "within ~1 point" of the seed's metric (ROUGE / F1 on a 0-1 scale)


def vocab_pruning_keeps_reference_quality(folder: Path) -> list[Claim]:
    """The seed's own metric and bar: the answer's ROUGE-L against the task's reference, pruned minus unpruned CALM,
    within about one point (above -0.01), one claim per model."""
    def claim(model: str = "") -> Claim:
        return Claim("000", f"CALM with the exit check pruned to k = 256 candidates scores within ~1 point of unpruned "
                            f"CALM on the seed's metric{_on(model)} (ROUGE-L of the answer vs the reference, pruned "
                            "minus unpruned, above -0.01)",
                     "T5-large SQuAD F1 / SAMSum ROUGE: within ~1 point of unpruned CALM at k = 256")

    def measure(one: Claim, rows: pd.DataFrame, pruned: str, model: str) -> Claim:
        if "rougeL_vs_reference" not in rows or rows.rougeL_vs_reference.isna().all():
            return missing_tables(one, "02_generation_items (no rougeL_vs_reference)")
        rows = rows.dropna(subset=["rougeL_vs_reference"])
        one.measured, one.ci_low, one.ci_high, one.n = paired_difference(rows, pruned, "none", "rougeL_vs_reference")
        one.bar = -SEED_000_POINTS
        one.source = f"02_generation_items.csv ({model}, '{pruned}' vs 'none', paired over prompts with a reference)"
        return one.decide(above=True)

    return _each_model(folder, "02_generation_items", claim, measure)


def vocab_pruning_speeds_up_calm(folder: Path) -> list[Claim]:
    def claim(model: str = "") -> Claim:
        return Claim("000", f"Pruning the exit check to k = 256 candidates makes CALM faster{_on(model)} (paired speed "
                            "ratio, pruned / unpruned, its 95% interval over prompts above 1)",
                     "fewer FLOPs per check: (2d - 1) k instead of (2d - 1) V")

    def measure(one: Claim, rows: pd.DataFrame, pruned: str, model: str) -> Claim:
        speed = paired_speedup(rows, pruned, "none")
        one.measured, one.ci_low, one.ci_high, one.n = (speed["mean"], speed["ci_low"], speed["ci_high"],
                                                        speed["n_prompts"])
        one.bar = 1.0
        one.source = (f"02_generation_timings.csv ({model}; paired ratio, 95% CI over {one.n} prompts, "
                      f"{speed['rounds']} rounds)")
        return one.decide(above=True)

    return _each_model(folder, "02_generation_timings", claim, measure)


VOCAB_CHECK_FLOPS_BAR = 0.5  # the check's FLOPs per token at least halved: (2d - 1) k per check instead of (2d - 1) V


def vocab_pruning_cuts_check_flops(folder: Path) -> list[Claim]:
    """The FLOPs CALM's exit check spends per generated token, pruned to k = 256 over unpruned, paired over prompts
    (the seed's argument for pruning; counted by the engine at every check it ran, the full head of the first
    check of a token included), below one half."""
    def claim(model: str = "") -> Claim:
        return Claim("000", f"Pruning the exit check to k = 256 candidates at least halves the FLOPs CALM's checks "
                            f"spend per generated token{_on(model)} (pruned / unpruned, paired over prompts, below 0.5)",
                     "(2d - 1) k instead of (2d - 1) V FLOPs per check")

    def measure(one: Claim, rows: pd.DataFrame, pruned: str, model: str) -> Claim:
        pivot = rows[rows.label.isin([pruned, "none"])].pivot(index="prompt", columns="label",
                                                              values="confidence_flops_per_token").dropna()
        if pruned not in pivot or "none" not in pivot:
            return missing_tables(one, "02_generation_items (confidence_flops_per_token)")
        one.measured, one.ci_low, one.ci_high = paired_ratio_ci(pivot[pruned], pivot["none"])
        one.n, one.bar = len(pivot), VOCAB_CHECK_FLOPS_BAR
        one.source = f"02_generation_items.csv ({model}, '{pruned}' vs 'none', ratio of means paired over prompts)"
        return one.decide(above=False)

    return _each_model(folder, "02_generation_items", claim, measure)


# ---- seed 001: early exit (FREE, CALM, self-speculation) ----------------------------------------------


TRAINED = "after: trained"  # notebook 08's rows decoded through the trained exits


def _trained(table: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows of the exit-trained model (notebook 08 has before / after rows in an ``exits`` column)."""
    if table is None or "exits" not in table:
        return table
    return table[table.exits == TRAINED]


def _fastest(summary: pd.DataFrame, methods: tuple[str, ...], bar: float = 0.9) -> pd.Series | None:
    """The fastest row of ``methods`` whose ROUGE-L vs full depth (its interval's low end) reaches ``bar``."""
    rows = summary[summary.method.isin(methods) & (summary.rougeL_vs_full_ci_low >= bar)]
    if "speedup_vs_hf" in rows:  # settings run for quality only (not timed) cannot be the fastest
        rows = rows[rows.speedup_vs_hf.notna()]
    return None if rows.empty else rows.sort_values("speedup_vs_hf").iloc[-1]


def free_faster_than_calm(folder: Path, table: str = "08_speed_quality") -> Claim:
    claim = Claim("001", "FREE is faster than CALM at equal quality (fastest of each whose ROUGE-L vs full depth "
                         "has its 95% low end >= 0.9; paired speed ratio FREE / CALM, its 95% interval over prompts "
                         "above 1)",
                  "FREE 1.5-2.2x vs CALM's 1.2-1.6x at ~99% of full quality (T5-large, trained exits)")
    summary = _trained(read_table(folder, table))
    timings = _trained(read_table(folder, table.replace("speed_quality", "timings")))
    if summary is None or timings is None:
        return missing_tables(claim, table, table.replace("speed_quality", "timings"))
    free, calm = _fastest(summary, ("free",)), _fastest(summary, ("calm",))
    if free is None or calm is None:
        claim.source = (f"{table}.csv: no {'FREE' if free is None else 'CALM'} setting reaches ROUGE-L 0.9 "
                        "(low end of its interval)")
        return claim
    speed = paired_speedup(timings, free.label, calm.label)
    claim.measured, claim.ci_low, claim.ci_high, claim.n = (speed["mean"], speed["ci_low"], speed["ci_high"],
                                                            speed["n_prompts"])
    claim.bar = 1.0
    claim.decide(above=True)
    claim.source = f"{table}.csv / {table.replace('speed_quality', 'timings')}.csv ('{free.label}' vs '{calm.label}')"
    return claim


def free_speedup(folder: Path, table: str = "08_speed_quality", bar: float = 1.7) -> Claim:
    claim = Claim("001", f"FREE decodes at least {bar}x faster than HF generate while keeping ROUGE-L >= 0.9 against "
                         "the full-depth output (paired speed ratio, its 95% interval over prompts above the bar)",
                  "FREE: up to 2.16x at ~99% of full quality")
    summary = _trained(read_table(folder, table))
    if summary is None:
        return missing_tables(claim, table)
    if "speedup_vs_hf_ci_low" not in summary:
        return missing_tables(claim, f"{table} (paired speed columns: written before paired timing, re-run 08)")
    claim.bar = bar
    claim.ceiling = _best_ceiling(summary, "free")
    free = _fastest(summary, ("free",))
    if free is None:
        claim.source = f"{table}.csv: no FREE setting reaches ROUGE-L 0.9 (low end of its interval)"
        return claim.decide(above=True) if math.isfinite(claim.ceiling) else claim
    claim.measured, claim.ci_low, claim.ci_high = (free.speedup_vs_hf, free.speedup_vs_hf_ci_low,
                                                   free.speedup_vs_hf_ci_high)
    claim.n = int(free.n_speed_prompts)
    claim.decide(above=True)
    claim.source = f"{table}.csv ('{free.label}', ROUGE-L {free.rougeL_vs_full:.3f}, {int(free.n_prompts)} prompts)"
    if math.isfinite(claim.ceiling):
        claim.source += f"; weight-read ceiling of its best setting {claim.ceiling:.2f}x"
    return claim


def _best_ceiling(summary: pd.DataFrame, method: str) -> float:
    """The highest weight-read ceiling (``speedup_ceiling``) of ``method``'s settings: the most any of them could
    give on this model (NaN for tables written before the column existed)."""
    if "speedup_ceiling" not in summary:
        return math.nan
    values = summary.loc[summary.method == method, "speedup_ceiling"].dropna()
    return float(values.max()) if len(values) else math.nan


def self_speculation_lossless_speedup(folder: Path, table: str = "08_speed_quality") -> Claim:
    claim = Claim("001", "Self-speculative decoding gives exactly the full model's tokens and is faster than HF "
                         "generate (paired speed ratio, its 95% interval over prompts above 1; every prompt "
                         "identical)",
                  "LayerSkip: 1.8-2.2x on Llama, identical output")
    summary = _trained(read_table(folder, table))
    if summary is None:
        return missing_tables(claim, table)
    if "speedup_vs_hf_ci_low" not in summary:
        return missing_tables(claim, f"{table} (paired speed columns: written before paired timing, re-run 08)")
    rows = summary[summary.method == "self-spec"]
    if rows.empty:
        return missing_tables(claim, f"{table} (no self-spec row)")
    best = rows.sort_values("speedup_vs_hf").iloc[-1]
    claim.measured, claim.ci_low, claim.ci_high = (best.speedup_vs_hf, best.speedup_vs_hf_ci_low,
                                                   best.speedup_vs_hf_ci_high)
    claim.n = int(best.n_speed_prompts)
    claim.bar = 1.0
    claim.ceiling = _best_ceiling(summary, "self-spec")  # at full acceptance, the best draft layer and length
    claim.decide(above=True)
    if best.identical_to_full < 1.0:
        claim.verdict, claim.n_to_decide = FAILS, math.nan
    claim.source = (f"{table}.csv ('{best.label}', identical outputs on {best.identical_to_full:.0%} of "
                    f"{int(best.n_prompts)} prompts, acceptance {best.acceptance_rate:.2f})")
    return claim


def calm_no_real_speedup(folder: Path, table: str = "08_speed_quality") -> Claim:
    """CALM's fastest setting that keeps ROUGE-L >= 0.9 (low end of its interval) on the trained exits, paired
    speed against HF generate: the claim that its per-layer checks and state copying leave it no faster holds when
    the whole interval lies below 1."""
    claim = Claim("001", "CALM gives no real speed-up: its fastest setting keeping ROUGE-L >= 0.9 against full depth "
                         "is not faster than HF generate (paired speed ratio, its 95% interval below 1)",
                  "FREE: CALM's exit checks and state copying eat its savings in practice")
    summary = _trained(read_table(folder, table))
    if summary is None:
        return missing_tables(claim, table)
    if "speedup_vs_hf_ci_low" not in summary:
        return missing_tables(claim, f"{table} (paired speed columns)")
    calm = _fastest(summary, ("calm",))
    if calm is None:
        claim.source = f"{table}.csv: no timed CALM setting reaches ROUGE-L 0.9 (low end of its interval)"
        return claim
    claim.measured, claim.ci_low, claim.ci_high = (calm.speedup_vs_hf, calm.speedup_vs_hf_ci_low,
                                                   calm.speedup_vs_hf_ci_high)
    claim.n, claim.bar = int(calm.n_speed_prompts), 1.0
    claim.decide(above=False)
    claim.source = f"{table}.csv ('{calm.label}', ROUGE-L {calm.rougeL_vs_full:.3f}, {calm.avg_layers:.1f} layers/token)"
    return claim


FREE_REFERENCE_SHARE = 0.99  # seed 001: FREE keeps ~99% of the full model's quality


def free_keeps_reference_quality(folder: Path, table: str = "08_generation_items") -> Claim:
    """FREE's fastest setting keeping ROUGE-L >= 0.9 against full depth (notebook 08's trained rows): its ROUGE-L
    against the tasks' references as a share of full depth's, the ratio of means paired over prompts, above 0.99."""
    claim = Claim("001", "FREE keeps ~99% of the full model's quality on the seed's metric (ROUGE-L vs the references, "
                         "FREE's fastest setting at ROUGE-L >= 0.9 vs full depth over full depth's, above 0.99)",
                  "FREE: ~99% of full quality at up to 2.16x (T5-large)")
    items = _trained(read_table(folder, table))
    summary = _trained(read_table(folder, table.replace("generation_items", "speed_quality")))
    if items is None or summary is None:
        return missing_tables(claim, table, table.replace("generation_items", "speed_quality"))
    free = _fastest(summary, ("free",))
    if free is None:
        claim.source = f"{table}.csv: no timed FREE setting reaches ROUGE-L 0.9 (low end of its interval)"
        return claim
    pivot = items[items.label.isin([free.label, "full"])].pivot(index="prompt", columns="label",
                                                               values="rougeL_vs_reference").dropna()
    if free.label not in pivot or "full" not in pivot:
        return missing_tables(claim, f"{table} ('{free.label}' and 'full' with references)")
    claim.measured, claim.ci_low, claim.ci_high = paired_ratio_ci(pivot[free.label], pivot["full"])
    claim.n, claim.bar = len(pivot), FREE_REFERENCE_SHARE
    claim.decide(above=True)
    claim.source = f"{table}.csv ('{free.label}' over 'full', ratio of means paired over prompts with a reference)"
    return claim


def adaptive_matches_fixed(folder: Path, table: str = "08_generation_items") -> Claim:
    """FREE's adaptive threshold against the fixed threshold nearest it in layers per token: ROUGE-L against full
    depth, adaptive minus fixed, paired over prompts, above -0.05 (as good at about the same cost). On notebook 08's
    trained exit (FREE's exits are trained; its ``after: trained`` rows, 102 prompts), or any table of generation
    items with FREE rows (``01_generation_items``: the fitted exits)."""
    claim = Claim("001", "FREE's adaptive threshold keeps the quality of the fixed threshold nearest it in layers per "
                         "token (ROUGE-L vs full depth, adaptive minus fixed, paired over prompts, above -0.05)",
                  "FREE: the adaptive threshold estimator matches a tuned fixed threshold without tuning")
    items = read_table(folder, table)
    if items is None:
        return missing_tables(claim, table)
    if "exits" in items:  # notebook 08: the trained exit's rows (the fitted ones are its "before" panel)
        items = items[items.exits == TRAINED]
    free = items[items.method == "free"]
    adaptive_labels = [label for label in free.label.unique() if "adaptive" in label]
    fixed_labels = [label for label in free.label.unique() if "adaptive" not in label and "rollback" not in label]
    if not adaptive_labels or not fixed_labels:
        return missing_tables(claim, f"{table} (FREE adaptive and fixed rows)")
    layers = free.groupby("label").avg_layers.mean()
    adaptive = adaptive_labels[0]
    fixed = min(fixed_labels, key=lambda label: abs(layers[label] - layers[adaptive]))
    claim.measured, claim.ci_low, claim.ci_high, claim.n = paired_difference(items, adaptive, fixed, "rougeL_vs_full")
    claim.bar = -QUALITY_TOLERANCE
    claim.decide(above=True)
    claim.source = (f"{table}.csv ('{adaptive}' at {layers[adaptive]:.1f} layers/token vs '{fixed}' at "
                    f"{layers[fixed]:.1f}; paired over prompts)")
    return claim


# ---- seed 003: layer selection ------------------------------------------------------------------------


def skipping_beats_early_exit(folder: Path) -> Claim:
    claim = Claim("003", "At equal layer counts (the budget nearest half the layers), skipping layers keeps the output "
                         "closer to the full model than early exit (ROUGE-L vs full depth, skipping minus early exit, "
                         "above 0)",
                  "OPT-IML-1.3b: a pretrained decoder is far more robust to skipping than to early exit")
    items = read_table(folder, "03_generation_items")
    if items is None:
        return missing_tables(claim, "03_generation_items")
    budgets = {label.split(" ")[-1] for label in items.label if label.startswith("skipping")}
    if not budgets:
        return missing_tables(claim, "03_generation_items (no skipping rows)")

    def distance_from_half(count: str) -> tuple[float, float]:  # "15/30" -> 0.0; ties: the larger budget
        ran, total = (int(part) for part in count.split("/"))
        return abs(ran / total - 0.5), -ran / total

    middle = min(budgets, key=distance_from_half)  # the budget nearest half the depth
    a, b = f"skipping {middle}", f"early exit {middle}"
    claim.measured, claim.ci_low, claim.ci_high, claim.n = paired_difference(items, a, b, "rougeL_vs_full")
    claim.bar = 0.0
    claim.decide(above=True)
    claim.source = f"03_generation_items.csv ('{a}' vs '{b}', paired over prompts)"
    return claim


ORACLE_SHARE = 0.233  # seed 003: the oracle matches the full model with 23.3% of the layers


def oracle_layer_share(folder: Path, bootstrap: int = 2000, seed: int = 0) -> Claim:
    claim = Claim("003", f"A per-sequence oracle over the budget models matches the full model's mean ROUGE-L "
                         f"(vs references) with at most {ORACLE_SHARE:.1%} of the layers on average (the paper's share)",
                  "OPT-IML-1.3b / Alpaca: 23.3% of the layers")
    items, costs = read_table(folder, "03_oracle_items"), read_table(folder, "03_oracle_costs")
    if items is None or costs is None:
        return missing_tables(claim, "03_oracle_items", "03_oracle_costs")
    from effllm.oracle import oracle_fraction_to_match

    per_item = items.set_index("prompt")
    budget = dict(zip(costs.label, costs.layers, strict=True))
    n_layers = int(costs.layers.max())
    claim.measured = oracle_fraction_to_match(per_item, budget, float(per_item["full"].mean()), n_layers)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):  # resample prompts; the oracle and its target are recomputed on each resample
        sample = per_item.iloc[rng.integers(0, len(per_item), len(per_item))].reset_index(drop=True)
        draws.append(oracle_fraction_to_match(sample, budget, float(sample["full"].mean()), n_layers))
    claim.ci_low, claim.ci_high = (float(v) for v in np.nanpercentile(draws, [2.5, 97.5]))
    claim.n = len(per_item)
    claim.bar = ORACLE_SHARE
    claim.decide(above=False)
    claim.source = "03_oracle_items.csv, 03_oracle_costs.csv (percentile bootstrap over prompts)"
    return claim


# seed 003's Alpaca ROUGE-L of the early-exit models at 4, 8 and 12 of 24 layers and of the full model
ALPACA_ROUGE = {4 / 24: 0.249, 8 / 24: 0.309, 12 / 24: 0.321}
ALPACA_FULL = 0.342


def early_exit_reference_share(folder: Path) -> list[Claim]:
    """Per budget of the seed's table (4, 8, 12 of 24 layers; here the same fractions of the depth): early exit's
    ROUGE-L against the references as a share of full depth's, paired over prompts, against the seed's share
    (0.249 / 0.342 = 0.73, 0.90, 0.94): the model-free form of its per-budget table."""
    items = read_table(folder, "03_generation_items")
    claims = []
    for fraction, score in ALPACA_ROUGE.items():
        share = score / ALPACA_FULL
        text = (f"Early exit at {fraction:.0%} of the layers keeps at least {share:.0%} of the full model's ROUGE-L "
                "against the references (the seed's share at that budget; ratio of means paired over prompts)")
        claim = Claim("003", text, f"OPT-IML-1.3b / Alpaca: {score} at {round(fraction * 24)} of 24 layers, "
                                   f"{ALPACA_FULL} at 24")
        if items is None:
            claims.append(missing_tables(claim, "03_generation_items"))
            continue
        labels = [label for label in items.label.unique() if label.startswith("early exit ")]
        match = [label for label in labels if math.isclose(_count_fraction(label.split(" ")[-1]), fraction)]
        if not match:
            claim.source = (f"03_generation_items.csv: no early-exit budget at {fraction:.3g} of the layers (has "
                            f"{', '.join(sorted(label.split(' ')[-1] for label in labels)) or 'none'})")
            claims.append(claim)
            continue
        pivot = items[items.label.isin([match[0], "full"])].pivot(index="prompt", columns="label",
                                                                 values="rougeL_vs_reference").dropna()
        claim.measured, claim.ci_low, claim.ci_high = paired_ratio_ci(pivot[match[0]], pivot["full"])
        claim.n, claim.bar = len(pivot), share
        claim.decide(above=True)
        claim.source = (f"03_generation_items.csv ('{match[0]}' over 'full': ROUGE-L vs reference "
                        f"{pivot[match[0]].mean():.3f} / {pivot['full'].mean():.3f}; paired over prompts)")
        claims.append(claim)
    return claims


def _count_fraction(count: str) -> float:
    """"5/30" -> 1/6."""
    ran, total = (int(part) for part in count.split("/"))
    return ran / total


CONTROLLER_MARGIN = 0.05  # "barely beat": less than 0.05 ROUGE-L better


def controllers_barely_beat_fixed(folder: Path) -> Claim:
    """Hidden-state against fixed-input skip controllers, each measured by its gain over random skipping at its
    own layer budget (the two controllers settle at different budgets, so their raw scores are not like for like):
    per prompt (hidden - random at its budget) - (fixed - random at its budget), ROUGE-L against the references,
    below 0.05."""
    claim = Claim("003", "Hidden-state skip controllers barely beat fixed-input ones (gain over random skipping at "
                         "the same layer budget, hidden minus fixed, ROUGE-L vs the references, below 0.05)",
                  "OPT-IML-1.3b: per-token controllers on the hidden state barely beat fixed per-layer decisions")
    items = read_table(folder, "03_controller_items")
    if items is None:
        return missing_tables(claim, "03_controller_items")
    labels = {"h": "controller (hidden state)", "f": "controller (fixed input)",
              "rh": "random at hidden state budget", "rf": "random at fixed input budget"}
    pivot = items[items.label.isin(labels.values())].pivot(index="prompt", columns="label",
                                                           values="rougeL_vs_reference").dropna()
    if not set(labels.values()) <= set(pivot):
        return missing_tables(claim, "03_controller_items (both controllers and their random baselines)")
    gain_hidden = pivot[labels["h"]] - pivot[labels["rh"]]
    gain_fixed = pivot[labels["f"]] - pivot[labels["rf"]]
    claim.paired(gain_hidden, gain_fixed, above=False, bar=CONTROLLER_MARGIN)
    fractions = items.groupby("label").avg_layers.mean()
    claim.source = (f"03_controller_items.csv (hidden state at {fractions[labels['h']]:.1f} layers/token, fixed input "
                    f"at {fractions[labels['f']]:.1f}; each against random skipping at its budget; paired over prompts)")
    return claim
