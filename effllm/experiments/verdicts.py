"""What a claim of the claims report is and how it is decided (:mod:`effllm.experiments.claims`): the
:class:`Claim` record, the verdicts ``holds`` / ``does not hold`` / ``undecided at this n`` of an interval against
a bar (and ``cannot hold on this model`` where the bar lies above the model's ceiling), and the readers every claim shares (a notebook's table, a paired difference over items, the ratio of two
settings' speeds within each timing round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from effllm.experiments.stats import paired_difference_ci

HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "undecided at this n"
CANNOT = "cannot hold on this model"  # the bar lies beyond the model's physical ceiling: no n decides otherwise
COLUMNS = ["seed", "claim", "original", "measured", "ci_low", "ci_high", "n", "verdict", "bar", "ceiling",
           "n_to_decide", "source"]
QUALITY_TOLERANCE = 0.05  # "keeps quality": a ROUGE-L loss smaller than this


@dataclass
class Claim:
    seed: str
    claim: str
    original: str
    measured: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    n: int = 0
    verdict: str = UNDECIDED
    bar: float = math.nan  # the value the interval is compared with
    # the most the quantity can be on this model (a speed-up's weight-read ceiling, effllm.decoding.ceilings)
    ceiling: float = math.nan
    n_to_decide: float = math.nan  # undecided: about how many items would put the interval clear of the bar
    source: str = ""

    def paired(self, a: Any, b: Any, above: bool, bar: float = 0.0) -> Claim:
        """Mean of ``a`` minus ``b`` (paired items) with its bootstrap interval and n, decided against ``bar``."""
        self.measured, self.ci_low, self.ci_high = paired_difference_ci(a, b)
        self.n = len(a)
        self.bar = bar
        return self.decide(above=above)

    def decide(self, above: bool) -> Claim:
        """Set the verdict ("the quantity is above / below ``bar``") and, when undecided, the n that would
        decide it at the same spread: an interval's half-width shrinks as 1 / sqrt(n)."""
        if above and math.isfinite(self.ceiling) and self.ceiling < self.bar:
            # whatever was measured: the claim asks for more than the model can physically give
            self.verdict = CANNOT
            return self
        judge = verdict_above if above else verdict_below
        # one item or one timing round has no spread to speak of: nothing can be decided from it
        self.verdict = judge(self.ci_low, self.ci_high, self.bar) if self.n >= 2 else UNDECIDED
        distance = abs(self.measured - self.bar)
        half_width = (self.ci_high - self.ci_low) / 2
        if (self.verdict == UNDECIDED and self.n and math.isfinite(distance) and distance > 0
                and math.isfinite(half_width)):  # no interval (NaN bounds): nothing says what n would decide it
            self.n_to_decide = float(math.ceil(self.n * (half_width / distance) ** 2))
        return self


def verdict_above(low: float, high: float, bar: float) -> str:
    """The claim "the quantity is above ``bar``" against its interval [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return UNDECIDED
    if low > bar:
        return HOLDS
    if high < bar:
        return FAILS
    return UNDECIDED


def verdict_below(low: float, high: float, bar: float) -> str:
    """The claim "the quantity is below ``bar``" against its interval [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return UNDECIDED
    if high < bar:
        return HOLDS
    if low > bar:
        return FAILS
    return UNDECIDED


def read_table(folder: Path, name: str) -> pd.DataFrame | None:
    """The notebook table ``folder/name.csv``, or None when it is missing."""
    path = folder / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def missing_tables(claim: Claim, *names: str) -> Claim:
    """``claim`` left undecided because the tables ``names`` are missing (its source says which)."""
    claim.source = "missing: " + ", ".join(f"{n}.csv" for n in names)
    return claim


def paired_difference(items: pd.DataFrame, a: str, b: str, column: str, key: str = "prompt") -> tuple[float, float, float, int]:
    """Mean of ``column`` under label ``a`` minus under label ``b``, paired by ``key``, with its interval."""
    pivot = items[items.label.isin([a, b])].pivot(index=key, columns="label", values=column).dropna()
    if a not in pivot or b not in pivot or pivot.empty:
        return math.nan, math.nan, math.nan, 0
    mean, low, high = paired_difference_ci(pivot[a].to_numpy(), pivot[b].to_numpy())
    return mean, low, high, len(pivot)


def round_ratio(timings: pd.DataFrame, a: str, b: str) -> tuple[float, float, float, int]:
    """Median, min and max over rounds of the speed ratio of label ``a`` to label ``b`` (same round)."""
    per_round = timings.pivot(index="round", columns="label", values="tokens_per_s")
    if a not in per_round or b not in per_round:
        return math.nan, math.nan, math.nan, 0
    ratio = (per_round[a] / per_round[b]).dropna()
    return float(ratio.median()), float(ratio.min()), float(ratio.max()), len(ratio)
