"""The claims of the compression seeds for the claims report (:mod:`effllm.experiments.claims` runs them): seed 002
(domain sub-models by Wanda pruning) and seed 004 (dynamic slicing). Each reads the notebook tables it needs from a
figures folder and returns decided :class:`Claim` records, or undecided ones naming the missing table. The decoding
seeds' claims (000, 001, 003) are in :mod:`effllm.experiments.claims_by_seed`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from effllm.experiments.stats import difference_ci, paired_difference_ci
from effllm.experiments.verdicts import Claim, missing_tables, read_table

# ---- seed 002: domain sub-models ----------------------------------------------------------------------


def in_domain_claims(windows: pd.DataFrame, source: str = "04_domain_windows.csv") -> list[Claim]:
    """Per domain: held-out log-perplexity of the best in-domain sub-model minus the best other sub-model's (each
    chosen by its mean over the windows, so both sides are picked the same way), paired over evaluation windows
    (below 0: the in-domain calibration wins its domain). With one set per domain the in-domain side is that set.
    ``windows`` has the columns of ``04_domain_windows.csv``: calibration, calibration_domain, eval_domain, window,
    nll."""
    claims = []
    for domain, group in windows[windows.calibration_domain != "dense"].groupby("eval_domain", sort=False):
        claim = Claim("002", f"In-domain calibration gives the best held-out {domain} perplexity (log-ppl of the "
                             f"best {domain}-calibrated sub-model minus the best other one, below 0)",
                      "seed 002's table: each domain's calibration wins its own column")
        own = group[group.calibration_domain == domain]
        others = group[group.calibration_domain != domain]
        if own.empty or others.empty:
            claims.append(missing_tables(claim, "04_domain_windows (domain rows)"))
            continue
        own_name = own.groupby("calibration").nll.mean().idxmin()
        best_other = others.groupby("calibration").nll.mean().idxmin()
        pivot = group[group.calibration.isin([own_name, best_other])].pivot(index="window", columns="calibration",
                                                                            values="nll").dropna()
        claim.paired(pivot[own_name], pivot[best_other], above=False)
        claim.source = f"{source} (best in-domain '{own_name}' vs the best other, '{best_other}'; paired over windows)"
        claims.append(claim)
    return claims


def in_domain_calibration_wins(folder: Path) -> list[Claim]:
    """:func:`in_domain_claims` from ``04_domain_windows.csv`` in ``folder``."""
    windows = read_table(folder, "04_domain_windows")
    if windows is None:
        return [missing_tables(Claim("002", "In-domain calibration gives the best held-out perplexity on its own domain",
                               "Gemma-7B / CodeLlama: in-domain calibration wins its domain"), "04_domain_windows")]
    return in_domain_claims(windows)


def in_domain_task_claims(items: pd.DataFrame, source: str = "04_task_items.csv") -> list[Claim]:
    """Seed 002's headline, per domain of its table: the task score (the mean over the domain's benchmarks of each
    benchmark's mean, ``effllm.domains.TASK_METRIC_DOMAINS``) of the best in-domain sub-model minus the best other
    one, paired over the benchmarks' items (each item weighted so every benchmark counts equally, as in the mean),
    above 0. Only sub-models scored on every benchmark of the domain compete. ``items`` has the columns of
    ``04_task_items.csv``: calibration, calibration_domain, metric, item, value."""
    from effllm.domains import TASK_METRIC_DOMAINS

    claims = []
    items = items[items.metric.isin(TASK_METRIC_DOMAINS) & (items.calibration_domain != "dense")]
    for domain in dict.fromkeys(TASK_METRIC_DOMAINS[m] for m in items.metric.unique()):
        claim = Claim("002", f"In-domain calibration gives the best {domain} task score (mean over the domain's "
                             f"benchmarks, best {domain}-calibrated sub-model minus the best other one, above 0)",
                      "seed 002's table: each domain's calibration wins its own column of task accuracy")
        group = items[items.metric.map(TASK_METRIC_DOMAINS) == domain]
        metrics = sorted(group.metric.unique())
        scored = [name for name, rows in group.groupby("calibration") if set(rows.metric) == set(metrics)]
        group = group[group.calibration.isin(scored)]
        score = group.groupby(["calibration", "metric"]).value.mean().groupby("calibration").mean()
        own = [name for name in score.index if (group[group.calibration == name].calibration_domain == domain).all()]
        others = [name for name in score.index if name not in own]
        if not own or not others:
            claim.source = (f"{source}: {domain} needs sub-models of {domain} and of another domain scored on "
                            f"{', '.join(metrics)} (scored: {', '.join(scored) or 'none'}; notebook 04's "
                            "task_submodels)")
            claims.append(claim)
            continue
        own_name, best_other = score[own].idxmax(), score[others].idxmax()
        pivot = (group[group.calibration.isin([own_name, best_other])]
                 .pivot_table(index=["metric", "item"], columns="calibration", values="value").dropna())
        weight = len(pivot) / (len(metrics) * pivot.groupby(level="metric").size())  # each benchmark equally
        scale = pivot.index.get_level_values("metric").map(weight).to_numpy()
        claim.paired(pivot[own_name] * scale, pivot[best_other] * scale, above=True)
        claim.source = (f"{source} (best in-domain '{own_name}' vs the best other, '{best_other}', on "
                        f"{', '.join(metrics)}; paired over items)")
        claims.append(claim)
    return claims


def in_domain_calibration_wins_tasks(folder: Path) -> list[Claim]:
    """:func:`in_domain_task_claims` from ``04_task_items.csv`` in ``folder``."""
    items = read_table(folder, "04_task_items")
    if items is None:
        return [missing_tables(Claim("002", "In-domain calibration gives the best task score on its own domain",
                                     "seed 002's table of task accuracy"), "04_task_items")]
    return in_domain_task_claims(items)


def same_domain_claim(pairs: pd.DataFrame, source: str = "04_jaccard_pairs.csv") -> Claim:
    """Mean Jaccard of same-domain pairs of calibration sets minus that of cross-domain pairs, the pair the unit:
    each pair's mean over layers, the two groups resampled on their own (above 0: masks of one domain are more
    alike). The layers of one pair are not independent draws (one calibration set decides all of them), so the
    interval is over pairs, and with a few same-domain pairs it is wide. ``pairs`` has the columns of
    ``04_jaccard_pairs.csv``: set_a, set_b, layer, jaccard, same_domain."""
    claim = Claim("002", "Masks calibrated on the same domain overlap more than masks of different domains (mean "
                         "Jaccard over layers of each pair of calibration sets, same-domain pairs minus cross-domain "
                         "pairs, above 0; the unit is the pair)",
                  "seed 002: sub-models of one domain share more of their pruned weights")
    same = pairs.same_domain.astype(str).str.lower() == "true"
    per_pair = (pairs.assign(same_domain=same).groupby(["set_a", "set_b", "same_domain"], as_index=False)
                .jaccard.mean())
    within, across = per_pair[per_pair.same_domain].jaccard, per_pair[~per_pair.same_domain].jaccard
    if within.empty or across.empty:
        claim.source = f"{source}: needs pairs of calibration sets within and across domains"
        return claim
    claim.measured, claim.ci_low, claim.ci_high = difference_ci(within.to_numpy(), across.to_numpy())
    claim.n = len(per_pair)
    claim.bar = 0.0
    claim.decide(above=True)
    claim.source = (f"{source} ({len(within)} same-domain and {len(across)} cross-domain pairs, each the mean over "
                    f"{pairs.layer.nunique()} layers; bootstrap over pairs)")
    return claim


def same_domain_masks_more_alike(folder: Path) -> Claim:
    """:func:`same_domain_claim` from ``04_jaccard_pairs.csv`` in ``folder``."""
    pairs = read_table(folder, "04_jaccard_pairs")
    if pairs is None:
        return missing_tables(same_domain_claim(pd.DataFrame(columns=["set_a", "set_b", "layer", "same_domain",
                                                                    "jaccard"])),
                        "04_jaccard_pairs")
    return same_domain_claim(pairs)


# seed 002's 2:4 speed-ups per projection group on CodeLlama-13B (its README's table, GPU)
SPARSE_GROUPS = {"q/k/v/o": (("q", "k", "v", "o"), "1.36x"), "up/gate": (("up", "gate"), "1.01x"),
                 "down": (("down",), "1.20x")}


def sparse_2_4_speedup(folder: Path) -> list[Claim]:
    """Per projection group of the seed (q/k/v/o, up/gate, down): whether 2:4 semi-structured sparse matmul beats
    dense at CodeLlama-13B's shapes, the group's slowest projection at the most tokens measured (median over
    interleaved rounds, the range of rounds as its interval, above 1). Undecided, with the reason, where no 2:4
    kernel ran (a CPU: PyTorch's 2:4 kernels need a CUDA GPU of compute capability >= 8.0)."""
    def claim(group: str) -> Claim:
        return Claim("002", f"2:4 semi-structured sparse matmul is faster than dense at CodeLlama-13B's {group} "
                            "projections (the group's slowest, median speed-up over interleaved rounds and its "
                            "range, above 1)",
                     f"CodeLlama-13B on a GPU: {group} {SPARSE_GROUPS[group][1]}")

    timings = read_table(folder, "05_projection_speedup")
    if timings is None:
        return [missing_tables(claim(group), "05_projection_speedup") for group in SPARSE_GROUPS]
    made = []
    for group, (kinds, _) in SPARSE_GROUPS.items():
        one = claim(group)
        rows = timings[timings.shapes.astype(str).str.startswith("CodeLlama") & timings.kind.isin(kinds)
                       & (timings["format"] == "semi-structured")]
        if rows.empty:
            formats = ", ".join(sorted(set(timings["format"].astype(str))))
            one.source = (f"05_projection_speedup.csv measured {formats} only: no 2:4 kernel on this device "
                          "(a CUDA GPU of compute capability >= 8.0 decides it)")
            made.append(one)
            continue
        at_most = rows[rows.tokens == rows.tokens.max()]
        row = at_most.sort_values("speedup").iloc[0]
        one.measured, one.ci_low, one.ci_high = (float(row.speedup), float(row.speedup_min), float(row.speedup_max))
        one.n = int(row.rounds)
        one.bar = 1.0
        one.decide(above=True)
        one.source = (f"05_projection_speedup.csv ({row.kind}, the slowest of {'/'.join(sorted(set(at_most.kind)))}, "
                      f"{int(row.tokens)} tokens, {row.device}; range of {one.n} rounds)")
        made.append(one)
    return made


# ---- seed 004: dynamic slicing ------------------------------------------------------------------------


def dynamic_beats_constant(folder: Path, matched: str = "mean") -> list[Claim]:
    """Dynamic minus constant slicing, held-out log-perplexity paired over windows, at each level M: at equal
    mean slice fraction (``matched="mean"``) or at equal parameter count (``matched="parameters"``)."""
    windows = read_table(folder, "06_slicing_windows")
    text = "equal mean slice fraction" if matched == "mean" else "equal parameter count"
    if windows is None:
        return [missing_tables(Claim("004", f"Dynamic slicing beats constant slicing at {text}",
                               "Llama-3-8B / Mistral-7B: up to -7% perplexity"), "06_slicing_windows")]
    claims = []
    for level, group in windows[windows.matched == matched].groupby("level", sort=True):
        claim = Claim("004", f"Dynamic slicing beats constant slicing at {text}, M = {level:g} (log-perplexity "
                             "dynamic minus constant, below 0)",
                      "Llama-3-8B / Mistral-7B: up to -7% perplexity, +5% accuracy vs constant at the same mean")
        pivot = group.pivot(index="window", columns="variant", values="nll")
        if "dynamic" not in pivot or "constant" not in pivot:
            claims.append(missing_tables(claim, "06_slicing_windows (variants)"))
            continue
        claim.paired(pivot["dynamic"], pivot["constant"], above=False)
        claim.source = f"06_slicing_windows.csv (M = {level:g}, {text}, paired over windows)"
        claims.append(claim)
    return claims


def dynamic_beats_shortgpt(folder: Path) -> list[Claim]:
    """Dynamic slicing against ShortGPT (whole layers removed, lowest block influence first, as many as give the
    constant model's parameter count), held-out log-perplexity paired over windows, at each level M where ShortGPT
    removes at least one layer (removing none is the dense model)."""
    text = "Dynamic slicing gives lower perplexity than ShortGPT removing whole layers at about the same size{}"
    original = "seed 004 builds on ShortGPT's layer scores; ShortGPT: removing the lowest-BI 25% of layers"
    windows = read_table(folder, "06_slicing_windows")
    if windows is None or "shortgpt" not in set(windows.variant):
        return [missing_tables(Claim("004", text.format(""), original),
                               "06_slicing_windows" + ("" if windows is None else " (no ShortGPT rows: it removes no "
                                                       "layer at these levels, or the table predates them)"))]
    claims = []
    for level, group in windows.groupby("level", sort=True):
        shortgpt = group[group.variant == "shortgpt"]
        if shortgpt.empty:
            continue
        claim = Claim("004", text.format(f", M = {level:g} (log-perplexity dynamic minus ShortGPT, below 0)"),
                      original)
        dynamic = group[(group.variant == "dynamic") & (group.matched == "mean")]
        pivot = pd.concat([dynamic, shortgpt]).pivot(index="window", columns="variant", values="nll").dropna()
        claim.paired(pivot["dynamic"], pivot["shortgpt"], above=False)
        claim.source = (f"06_slicing_windows.csv (M = {level:g}; dynamic {int(dynamic.parameters.iloc[0]):,} vs "
                        f"ShortGPT {int(shortgpt.parameters.iloc[0]):,} parameters; paired over windows)")
        claims.append(claim)
    return claims


SLICING_PERPLEXITY_GAIN = 0.07  # seed 004: "up to 7% lower perplexity" than constant slicing at the same mean
SLICING_ACCURACY_GAIN = 0.05  # ... and "up to 5% higher" average zero-shot accuracy (points on a 0-1 scale)


def _best_level(rows: pd.DataFrame, index: str, value: str, lowest: bool) -> tuple[Any, ...] | None:
    """(level, mean, low, high, n) of dynamic minus constant, paired over ``index``, at the level M whose mean
    difference is lowest (``lowest``) or highest; None when no level has both variants."""
    best = None
    for level, group in rows[rows.variant.isin(["dynamic", "constant"])].groupby("level", sort=True):
        pivot = group.pivot(index=index, columns="variant", values=value).dropna()
        if {"dynamic", "constant"} <= set(pivot):
            mean, low, high = paired_difference_ci(pivot["dynamic"], pivot["constant"])
            if best is None or (mean < best[1] if lowest else mean > best[1]):
                best = (level, mean, low, high, len(pivot))
    return best


def dynamic_magnitudes(folder: Path) -> list[Claim]:
    """The paper's magnitudes at its best level M (the level with the largest gain here, as "up to" reads):
    perplexity dynamic / constant at the same mean at least 7% lower (the ratio exp(mean log-perplexity difference)
    minus 1, below -0.07), and zero-shot accuracy at least 5 points higher (above +0.05). The level is picked on the
    same windows / items the interval is computed on, which favours the claim: a "does not hold" is conservative."""
    perplexity = Claim("004", "Dynamic slicing lowers perplexity by at least 7% against constant slicing at the same "
                              "mean, at its best level M (perplexity ratio minus 1, below -0.07)",
                       "Llama-3-8B / Mistral-7B: up to -7% perplexity vs constant at the same mean")
    windows = read_table(folder, "06_slicing_windows")
    best = None if windows is None else _best_level(windows[windows.matched == "mean"], "window", "nll", lowest=True)
    if best is None:
        perplexity = missing_tables(perplexity, "06_slicing_windows" + ("" if windows is None else " (variants)"))
    else:
        level, mean, low, high, perplexity.n = best
        perplexity.measured, perplexity.ci_low, perplexity.ci_high = math.expm1(mean), math.expm1(low), math.expm1(high)
        perplexity.bar = -SLICING_PERPLEXITY_GAIN
        perplexity.decide(above=False)
        perplexity.source = f"06_slicing_windows.csv (best level M = {level:g}; paired over windows)"
    accuracy = Claim("004", "Dynamic slicing raises zero-shot accuracy by at least 5 points against constant slicing "
                            "at the same mean, at its best level M (dynamic minus constant, above +0.05)",
                     "Llama-3-8B: up to +5% average zero-shot accuracy vs constant at the same mean")
    items = read_table(folder, "06_zero_shot_items")
    best = None if items is None else _best_level(items, "item", "correct", lowest=False)
    if best is None:
        accuracy = missing_tables(accuracy, "06_zero_shot_items" + ("" if items is None else " (dynamic rows)"))
    else:
        level, accuracy.measured, accuracy.ci_low, accuracy.ci_high, accuracy.n = best
        accuracy.bar = SLICING_ACCURACY_GAIN
        accuracy.decide(above=True)
        accuracy.source = f"06_zero_shot_items.csv (best level M = {level:g}; paired over items)"
    return [perplexity, accuracy]


def dynamic_accuracy(folder: Path) -> list[Claim]:
    """Per level M with zero-shot items: accuracy of dynamic minus constant slicing at the same mean, paired over
    items (every task's items pooled; item ids are unique across tasks)."""
    text = ("Dynamic slicing keeps more zero-shot accuracy than constant slicing at equal mean{} (accuracy "
            "dynamic minus constant, paired over items, above 0)")
    original = "up to +5% average zero-shot accuracy (Llama-3-8B)"
    items = read_table(folder, "06_zero_shot_items")
    if items is None:
        return [missing_tables(Claim("004", text.format(""), original), "06_zero_shot_items")]
    claims = []
    for level, group in items[items.variant.isin(["dynamic", "constant"])].groupby("level", sort=True):
        claim = Claim("004", text.format(f", M = {level:g}"), original)
        pivot = group.pivot(index="item", columns="variant", values="correct").dropna()
        if "dynamic" not in pivot or "constant" not in pivot:
            claims.append(missing_tables(claim, "06_zero_shot_items (variants)"))
            continue
        claim.paired(pivot["dynamic"], pivot["constant"], above=True)
        claim.source = f"06_zero_shot_items.csv (M = {level:g}, paired over items)"
        claims.append(claim)
    return claims or [missing_tables(Claim("004", text.format(""), original), "06_zero_shot_items (dynamic rows)")]
