"""Intervals for the numbers effllm reports: bootstrap confidence intervals of means and of paired differences,
and the median and spread of timing ratios over interleaved rounds.

    mean, low, high = mean_ci(per_prompt_rouge)                       # 95% interval of the mean
    diff, low, high = paired_difference_ci(rouge_pruned, rouge_full)   # same prompts, paired resampling

The resampling is scipy's ``scipy.stats.bootstrap`` (BCa, percentile where BCa is undefined), seeded so that a
re-run gives the same interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4000


def _bootstrap(samples: tuple[np.ndarray, ...], statistic, paired: bool, confidence: float, seed: int
               ) -> tuple[float, float]:
    from scipy import stats

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa warns on degenerate resamples; the percentile fallback follows
            result = stats.bootstrap(samples, statistic, paired=paired, vectorized=True, confidence_level=confidence,
                                     n_resamples=RESAMPLES, method=method, rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return low, high
    return math.nan, math.nan


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its bootstrap confidence interval. With fewer than two
    values the interval is (nan, nan); when every value is equal it is that value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    if np.all(x == x[0]):
        return mean, mean, mean
    low, high = _bootstrap((x,), lambda s, axis: np.mean(s, axis=axis), False, confidence, seed)
    return mean, low, high


def paired_difference_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0
                         ) -> tuple[float, float, float]:
    """(mean of a - b, low, high) with paired resampling: ``a[i]`` and ``b[i]`` are the same item under two
    settings, so the interval reflects the per-item differences, not the spread between items."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths; got {x.size} and {y.size}")
    return mean_ci(x - y, confidence, seed)


def ratio_summary(ratios: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-round speed ratios (each measured within one round, settings interleaved)."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}
