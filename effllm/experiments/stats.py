"""Intervals for the numbers effllm reports: bootstrap confidence intervals of means and of paired differences,
paired speed ratios over prompts, and the median and spread of timing ratios over interleaved rounds.

    mean, low, high = mean_ci(per_prompt_rouge)                       # 95% interval of the mean
    diff, low, high = paired_difference_ci(rouge_pruned, rouge_full)   # same prompts, paired resampling
    diff, low, high = difference_ci(same_domain_pairs, cross_pairs)    # two independent groups
    speed = paired_speedup(run.timings, "FREE 0.9", "hf_generate")     # paired per prompt, CI over prompts

The resampling of means is scipy's ``scipy.stats.bootstrap`` (BCa, percentile where BCa is undefined); that of
paired speed ratios a percentile bootstrap over prompts; both seeded so that a re-run gives the same interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

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


def difference_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0
                  ) -> tuple[float, float, float]:
    """(mean of a - mean of b, low, high) for two independent groups (say, same-domain and cross-domain pairs of
    masks): each group is resampled on its own, so the interval reflects how many units each side has. With fewer
    than two units on a side the interval is (nan, nan)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        return math.nan, math.nan, math.nan
    difference = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return difference, math.nan, math.nan
    if np.all(x == x[0]) and np.all(y == y[0]):
        return difference, difference, difference
    low, high = _bootstrap((x, y), lambda s, t, axis: np.mean(s, axis=axis) - np.mean(t, axis=axis), False,
                           confidence, seed)
    return difference, low, high


def paired_ratio_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0
                    ) -> tuple[float, float, float]:
    """(mean of a / mean of b, low, high) with paired resampling: the share of a reference's score that a setting
    keeps on the same items (say, ROUGE-L against the references of an early exit over that of full depth)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths; got {x.size} and {y.size}")
    if x.size == 0 or y.mean() == 0:
        return math.nan, math.nan, math.nan
    ratio = float(x.mean() / y.mean())
    if x.size < 2:
        return ratio, math.nan, math.nan
    if np.all(x == x[0]) and np.all(y == y[0]):
        return ratio, ratio, ratio
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high = _bootstrap((x, y), lambda s, t, axis: np.mean(s, axis=axis) / np.mean(t, axis=axis), True,
                               confidence, seed)
    return ratio, low, high


def ratio_summary(ratios: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-round speed ratios (each measured within one round, settings interleaved)."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}


PAIRED_RESAMPLES = 2000


def paired_ratio_summary(tokens: Any, seconds: Any, reference_tokens: Any, reference_seconds: Any, *,
                         confidence: float = CONFIDENCE, resamples: int = PAIRED_RESAMPLES, seed: int = 0
                         ) -> dict[str, float]:
    """The paired speed ratio of a setting to a reference from timings of the same prompts in the same rounds.

    Each argument is an array [prompts, rounds]: the tokens a call generated and its seconds, for the setting and
    for the reference (prompt p, round r: the same prompt, timed in the same interleaved round). Per prompt and
    round the ratio is ``(tokens / seconds) / (reference_tokens / reference_seconds)``; a prompt's ratio is the
    median over its rounds (NaN rounds left out). Returns ``mean`` (the mean over prompts of the per-prompt
    ratios), ``ci_low`` / ``ci_high`` (the 95% percentile bootstrap over prompts of that mean, ``resamples``
    resamples seeded by ``seed``; NaN with fewer than two prompts), ``round_min`` / ``round_max`` (the RANGE over
    rounds of the pooled ratio: every prompt's tokens over every prompt's seconds in that round, setting against
    reference; not an interval), ``n_prompts`` and ``rounds``."""
    arrays = [np.asarray(a, dtype=np.float64) for a in (tokens, seconds, reference_tokens, reference_seconds)]
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise ValueError(f"paired timings need four [prompts, rounds] arrays of one shape; got shapes "
                         f"{[a.shape for a in arrays]}")
    n_prompts, rounds = shape
    if not n_prompts or not rounds:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "round_min": math.nan,
                "round_max": math.nan, "n_prompts": n_prompts, "rounds": rounds}
    valid = np.logical_and.reduce([np.isfinite(a) for a in arrays])  # a call missing on either side: unpaired
    t, s, rt, rs = (np.where(valid, a, np.nan) for a in arrays)
    with np.errstate(divide="ignore", invalid="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a prompt with no finite round: NaN, left out below
            per_prompt = np.nanmedian((t / s) / (rt / rs), axis=1)
        pooled = (np.nansum(t, axis=0) / np.nansum(s, axis=0)) / (np.nansum(rt, axis=0) / np.nansum(rs, axis=0))
    per_prompt = per_prompt[np.isfinite(per_prompt)]
    pooled = pooled[np.isfinite(pooled)]
    mean = float(per_prompt.mean()) if per_prompt.size else math.nan
    low = high = math.nan
    if per_prompt.size >= 2:
        picks = np.random.default_rng(seed).integers(0, per_prompt.size, (resamples, per_prompt.size))
        means = per_prompt[picks].mean(axis=1)
        alpha = (1 - confidence) / 2
        low, high = (float(v) for v in np.quantile(means, [alpha, 1 - alpha]))
    return {"mean": mean, "ci_low": low, "ci_high": high,
            "round_min": float(pooled.min()) if pooled.size else math.nan,
            "round_max": float(pooled.max()) if pooled.size else math.nan,
            "n_prompts": int(per_prompt.size), "rounds": rounds}


def paired_speedup(timings: Any, label: str, reference: str, *, confidence: float = CONFIDENCE,
                   resamples: int = PAIRED_RESAMPLES, seed: int = 0) -> dict[str, float]:
    """:func:`paired_ratio_summary` of ``label`` against ``reference`` from a tidy timings table with one row per
    (round, label, prompt) and columns ``round``, ``label``, ``prompt``, ``seconds``, ``new_tokens`` (the
    ``timings`` of :func:`effllm.experiments.runs.run_policies`). Prompts and rounds that both labels were timed
    on are paired; a label missing from the table gives NaN. A table without a ``prompt`` column (one row per
    (round, label) over all timed prompts, as written before per-prompt timing) counts as one prompt: its
    interval is NaN (undecided), its round range still there."""
    if "prompt" not in timings:
        timings = timings.assign(prompt=0)
    def grid(name: str, column: str) -> Any:
        rows = timings[timings.label == name]
        return rows.pivot_table(index="prompt", columns="round", values=column, aggfunc="first")

    if label not in set(timings.label) or reference not in set(timings.label):
        return paired_ratio_summary(np.empty((0, 0)), np.empty((0, 0)), np.empty((0, 0)), np.empty((0, 0)))
    frames = [grid(label, "new_tokens"), grid(label, "seconds"), grid(reference, "new_tokens"),
              grid(reference, "seconds")]
    prompts = frames[0].index.intersection(frames[2].index)
    rounds = frames[0].columns.intersection(frames[2].columns)
    arrays = [f.reindex(index=prompts, columns=rounds).to_numpy() for f in frames]
    return paired_ratio_summary(*arrays, confidence=confidence, resamples=resamples, seed=seed)
