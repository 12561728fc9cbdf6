"""FREE's adaptive threshold estimator (Bae et al. 2023), as the authors' code computes it.

Followed: raymin0223/fast_robust_early_exit @3e503c5, ``util/bmm.py:10-116`` (``fit_beta_weighted``,
``BetaMixture1D.responsibilities / fit_supervised / predict_proba``) and ``models/deploying_t5.py:898-906``
(what is recorded), ``1047-1049`` and ``1208-1214`` (when it is fitted).

- **What is recorded.** At every synchronized pass (a token goes deep while shallow-exited tokens are stacked), each
  stacked token and the current one contribute (its shallow-exit confidence, 1[shallow argmax == deep argmax]). A
  token that goes deep with nothing stacked records nothing.
- **When it is fitted.** Once at the start of each new sequence, on everything recorded so far, while fewer than
  ``max_fits`` (300) fits have been made; never in the middle of a sequence. Before the first fit the threshold is
  the policy's own.
- **The fit.** Confidences are clipped to [1e-4, 1 - 1e-4]. The responsibilities are the labels, one-hot, with the
  other class floored: r = 0.2 onehot(y), r[r <= 1e-4] = 1e-4, each column normalised (so ~0.9995 / ~5e-4). Each
  class's Beta is fitted by weighted moments with the weighted *population* variance: alpha = m (m (1 - m) / s^2 - 1),
  beta = alpha (1 - m) / m. There is no class prior (the mixing weights are not used).
- **The threshold.** On the grid x = linspace(0.3, 0.9, 10), with i the component of the higher mean,
  pred = pdf_i(x) / (pdf_i(x) + pdf_j(x)) > zeta (0.4); the threshold is x[min(max(0, 10 - sum(pred)), 9)]. With
  one class only, both components get the same fit, every grid point passes and the threshold drops to 0.3.

Written here rather than imported: the authors' module is a script-level class tied to matplotlib and their T5 stack;
the Beta density is scipy's, as theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from effllm import checks

CLIP = 1e-4  # confidences are clipped to [CLIP, 1 - CLIP] before the fit (bmm.py:68-70)
FLOOR = 1e-4  # responsibilities at or below this are raised to it (bmm.py:30, 57)
LABEL_WEIGHT = 0.2  # (1 - lam_r) times the one-hot label (bmm.py:29, 54)


def fit_beta_weighted(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Beta parameters by weighted moments, with the weighted population variance (``bmm.py:10-15``)."""
    mean = np.sum(w * x) / np.sum(w)
    var = np.sum(w * (x - mean) ** 2) / np.sum(w)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = mean * ((mean * (1 - mean)) / var - 1)
        beta = alpha * (1 - mean) / mean
    return float(alpha), float(beta)


def responsibilities(labels: np.ndarray) -> np.ndarray:
    """[2, n]: the one-hot labels with the other class floored, each column summing to 1 (``bmm.py:49-59``)."""
    r = LABEL_WEIGHT * np.eye(2)[labels.astype(int)].T
    r[r <= FLOOR] = FLOOR
    return r / (r.sum(axis=0) + 1e-12)


def fit_components(confidences: Sequence[float], agreed: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, betas) of the two components (index 0: disagree, 1: agree) fitted on the observations."""
    x = np.clip(np.asarray(confidences, dtype=np.float64), CLIP, 1 - CLIP)
    r = responsibilities(np.asarray(agreed, dtype=bool))
    fits = [fit_beta_weighted(x, r[c]) for c in range(2)]
    return np.array([f[0] for f in fits]), np.array([f[1] for f in fits])


def threshold_from_components(alphas: np.ndarray, betas: np.ndarray, zeta: float = 0.4,
                              low: float = 0.3, high: float = 0.9, resolution: int = 10) -> float:
    """The count rule of ``BetaMixture1D.predict_proba`` (``bmm.py:110-116``): no class prior."""
    x = np.linspace(low, high, resolution)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = alphas / (alphas + betas)
        i = int(np.nanargmax(mean)) if not np.all(np.isnan(mean)) else 0
        li, lj = stats.beta.pdf(x, alphas[i], betas[i]), stats.beta.pdf(x, alphas[1 - i], betas[1 - i])
        passed = li / (li + lj) > zeta  # NaN compares False, as in numpy upstream
    index = min(max(0, resolution - int(passed.sum())), resolution - 1)
    return float(x[index])


class AdaptiveThreshold:
    """FREE's adaptive threshold (see the module docstring for the rule and the authors' lines it follows).

    One object persists across decoding calls (``Free(..., use_adapt_threshold=True, adapt_threshold=estimator)``);
    each decoding call is one sequence and calls :meth:`start_sequence` first, which refits on everything recorded
    by earlier sequences. ``history`` has one (sequence, observations so far, threshold) row per fit.
    """

    def __init__(self, initial: float = 0.9, zeta: float = 0.4, max_fits: int = 300,
                 grid: tuple[float, float, int] = (0.3, 0.9, 10)):
        self.threshold = checks.number("initial", initial, low=0)
        self.initial = self.threshold
        self.zeta = checks.fraction("zeta", zeta, zero=False, one=False)
        self.max_fits = checks.positive_int("max_fits", max_fits)
        low, high, resolution = grid
        if not (0 <= low < high <= 1) or int(resolution) != resolution or resolution < 2:
            raise ValueError(f"grid=(low, high, points) must have 0 <= low < high <= 1 and at least 2 points, "
                             f"got {grid!r} (the authors': (0.3, 0.9, 10))")
        self.grid = (float(low), float(high), int(resolution))
        self.confidences: list[float] = []
        self.agreed: list[bool] = []
        self.sequences = 0
        self.fits = 0
        self.history: list[tuple[int, int, float]] = []

    @property
    def frozen(self) -> bool:
        """True once ``max_fits`` fits have been made: the threshold no longer moves."""
        return self.fits >= self.max_fits

    @property
    def samples(self) -> list[tuple[float, bool]]:
        return list(zip(self.confidences, self.agreed, strict=True))

    def record(self, confidences: Sequence[float] | float, agreed: Sequence[bool] | bool) -> None:
        """Observations of one synchronized pass: each stacked token's and the current token's (confidence at the
        shallow exit, shallow argmax == deep argmax). Nothing is refitted until the next sequence starts."""
        if np.isscalar(confidences):
            confidences, agreed = [confidences], [agreed]
        if len(confidences) != len(agreed):
            raise ValueError(f"record() needs one agreement per confidence, got {len(confidences)} confidences "
                             f"and {len(agreed)} agreements")
        self.confidences.extend(float(c) for c in confidences)
        self.agreed.extend(bool(a) for a in agreed)

    def fit(self) -> float | None:
        """The threshold everything recorded so far gives (None with nothing recorded)."""
        if not self.confidences:
            return None
        low, high, resolution = self.grid
        alphas, betas = fit_components(self.confidences, self.agreed)
        return threshold_from_components(alphas, betas, self.zeta, low, high, resolution)

    def start_sequence(self) -> None:
        """A new sequence begins: refit on all observations so far (``deploying_t5.py:1208-1214``)."""
        self.sequences += 1
        if self.confidences and not self.frozen:
            self.threshold = self.fit()
            self.fits += 1
            self.history.append((self.sequences, len(self.confidences), self.threshold))
