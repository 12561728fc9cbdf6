"""Learn-then-Test calibration of an early-exit threshold (Angelopoulos et al. 2021; CALM, Schuster et al. 2022).

CALM's guarantee: with probability at least 1 - epsilon over the calibration set, the chosen threshold
lambda keeps the expected disagreement between the early-exit output and the full model's output at most
delta. Learn-then-Test turns that into multiple testing: for each candidate lambda the null hypothesis
"risk(lambda) > delta" gets a p-value from the empirical risk on n calibration prompts (the
Hoeffding-Bentkus bound); the candidates are tested in a fixed sequence from the safest (highest
threshold) down, and the sequence stops at the first one that is not rejected. Every rejected lambda is
valid; the lowest is the fastest.

    result = calibrate_threshold(model, prompts, max_new_tokens=32, candidates=[0.99, 0.95, 0.9, 0.8, 0.7],
                                 delta=0.2, epsilon=0.05, policy=Calm(candidate_layer=20))
    result.threshold     # None if even the safest candidate could not be certified

The binomial tail is written out here (a few lines) rather than taken from scipy, which effllm does not
otherwise need.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from effllm import decoding
from effllm.decoding import Calm, Free

DISTANCES = ("token", "rougeL")


def _kl_bernoulli(a: float, b: float) -> float:
    a = min(max(a, 1e-12), 1 - 1e-12)
    b = min(max(b, 1e-12), 1 - 1e-12)
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
            for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def hoeffding_bentkus_p_value(risk: float, delta: float, n: int) -> float:
    """The Hoeffding-Bentkus p-value of Learn-then-Test (Bates et al. 2021, eq. 21) for losses in [0, 1]:
    min(exp(-n h(min(risk, delta), delta)), e * P(Bin(n, delta) <= ceil(n risk)))."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1); got {delta!r}")
    hoeffding = math.exp(-n * _kl_bernoulli(min(risk, delta), delta))
    bentkus = math.e * binomial_cdf(math.ceil(n * risk), n, delta)
    return min(1.0, hoeffding, bentkus)


def n_to_certify(risk: float, delta: float, epsilon: float, limit: int = 1_000_000) -> float:
    """About the fewest calibration prompts at which an empirical ``risk`` would be certified (Hoeffding-Bentkus
    p-value <= ``epsilon``): an exponential then a binary search over n (the p-value falls with n up to the rounding
    of ceil(n risk)), then a scan of the 10% below its answer for the first certified n; inf when ``risk`` >= ``delta`` (no n certifies it) or beyond ``limit``. At risk 0 it is the
    smallest n with (1 - delta)^n <= epsilon (Hoeffding's term; Bentkus' is e times it): 9 for delta 0.25,
    epsilon 0.1, where 0.75^8 = 0.1001 certifies nothing at n = 8."""
    if not 0 <= risk <= 1:
        raise ValueError(f"risk must lie in [0, 1]; got {risk!r}")
    if risk >= delta:
        return math.inf

    def certified(n: int) -> bool:
        return hoeffding_bentkus_p_value(risk, delta, n) <= epsilon

    high = 1
    while not certified(high):
        high *= 2
        if high > limit:
            return math.inf
    low = high // 2  # not certified (or 0)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if certified(middle) else (middle, high)
    # ceil(n risk) makes the p-value saw-toothed near the answer: the first certified n can lie a little below
    return float(next(n for n in range(max(1, int(high * 0.9)), high + 1) if certified(n)))


@dataclass
class LTTResult:
    threshold: float | None  # the lowest certified candidate; None when none could be certified
    delta: float
    epsilon: float
    n: int
    table: pd.DataFrame  # candidate, risk, p_value, certified, tested, avg_layers, n_to_certify
    per_prompt: dict[float, list[float]] = field(default_factory=dict)


def learn_then_test(risks: dict[float, Sequence[float]], delta: float, epsilon: float,
                    avg_layers: dict[float, float] | None = None) -> LTTResult:
    """Fixed-sequence Learn-then-Test over ``risks`` (candidate threshold -> per-prompt losses in [0, 1]).

    Candidates are tested from the highest threshold (the most conservative) down; the first candidate
    whose p-value exceeds ``epsilon`` stops the sequence. Returns the lowest rejected (certified) candidate.
    """
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must lie in (0, 1); got {epsilon!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1); got {delta!r}")
    if not risks:
        raise ValueError("no candidate thresholds given")
    rows, chosen, stopped = [], None, False
    n = None
    for candidate in sorted(risks, reverse=True):
        losses = list(risks[candidate])
        if not losses or any(not 0 <= x <= 1 for x in losses):
            raise ValueError(f"losses for threshold {candidate} must be non-empty and lie in [0, 1]")
        n = len(losses) if n is None else n
        if len(losses) != n:
            raise ValueError(f"every candidate needs the same prompts: {len(losses)} losses for {candidate}, {n} before")
        risk = sum(losses) / n
        p_value = hoeffding_bentkus_p_value(risk, delta, n)
        rejected = not stopped and p_value <= epsilon
        rows.append({"candidate": candidate, "risk": risk, "p_value": p_value, "tested": not stopped,
                     "certified": rejected, "avg_layers": (avg_layers or {}).get(candidate),
                     # the calibration size at which this empirical risk would be certified (inf: never)
                     "n_to_certify": n_to_certify(risk, delta, epsilon)})
        if rejected:
            chosen = candidate
        else:
            stopped = True
    return LTTResult(chosen, delta, epsilon, n, pd.DataFrame(rows), {c: list(v) for c, v in risks.items()})


def disagreement(early: torch.Tensor, full: torch.Tensor, distance: str = "token",
                 decode: Callable[[torch.Tensor], str] | None = None) -> float:
    """D(Y_early, Y_full) in [0, 1]: the fraction of positions where the tokens differ (over the longer of
    the two), or 1 - ROUGE-L of the decoded texts (``decode`` needed)."""
    if distance == "token":
        length = max(len(early), len(full))
        if length == 0:
            return 0.0
        shared = min(len(early), len(full))
        return 1.0 - float((early[:shared] == full[:shared]).sum()) / length
    if distance == "rougeL":
        from effllm.metrics import rouge_l

        if decode is None:
            raise ValueError("distance='rougeL' needs decode= (for example tokenizer.decode)")
        return 1.0 - rouge_l([decode(early)], [decode(full)])
    raise ValueError(f"unknown distance {distance!r}; allowed: {', '.join(DISTANCES)}")


DECODE_OPTIONS = ("exit_transform", "eos_token_id")  # what calibrate_threshold passes on to decoding.decode


def calibrate_threshold(
    model: torch.nn.Module,
    prompts: Sequence[torch.LongTensor],
    max_new_tokens: int,
    candidates: Sequence[float],
    delta: float,
    epsilon: float,
    policy: Calm | Free,
    distance: str = "token",
    decode: Callable[[torch.Tensor], str] | None = None,
    progress: bool = True,
    **decode_options: Any,
) -> LTTResult:
    """Choose the ``threshold`` of a CALM or FREE ``policy`` (its own value is ignored) by Learn-then-Test: decode
    every prompt at full depth and with each candidate, measure the per-prompt disagreement of the generated
    tokens (``distance``), test. ``decode_options`` go to :func:`effllm.decoding.decode`: ``exit_transform`` (the
    candidates' decoding only) and ``eos_token_id``. Works on T5 too (the generated tokens are compared, whatever
    the encoder input)."""
    unknown = sorted(set(decode_options) - set(DECODE_OPTIONS))
    if unknown:
        raise TypeError(f"calibrate_threshold() got unexpected keyword argument(s) {unknown}; allowed besides its "
                        f"own: {', '.join(DECODE_OPTIONS)}")
    exit_transform = decode_options.get("exit_transform")
    eos_token_id = decode_options.get("eos_token_id")
    if not isinstance(policy, (Calm, Free)):
        raise ValueError(f"calibration is for a Calm or Free policy; got {type(policy).__name__}")
    if not candidates:
        raise ValueError("candidates must list at least one threshold")
    full = []
    for ids in tqdm(prompts, desc="full-depth references", disable=not progress):
        out = decoding.decode(model, ids, max_new_tokens, decoding.Full(), eos_token_id=eos_token_id)
        full.append(out.new_tokens()[0])
    risks, layers = {}, {}
    for candidate in tqdm(sorted(candidates, reverse=True), desc="candidates", disable=not progress):
        candidate_policy = dataclasses.replace(policy, threshold=candidate)
        losses, used, count = [], 0.0, 0
        for ids, reference in zip(prompts, full, strict=True):
            out = decoding.decode(model, ids, max_new_tokens, candidate_policy, eos_token_id=eos_token_id,
                                  exit_transform=exit_transform)
            losses.append(disagreement(out.new_tokens()[0], reference, distance, decode))
            used += float(out.num_layers_run.double().sum())
            count += out.num_layers_run.numel()
        risks[candidate], layers[candidate] = losses, used / count
    return learn_then_test(risks, delta, epsilon, layers)
