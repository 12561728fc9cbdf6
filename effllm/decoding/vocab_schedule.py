"""Vocabulary-pruning schedules of Vincenti et al. (seed 000), as the authors' code computes them.

Followed: MatteoNulli/Vocabulary_pruning at commit 7289604 (the last with the ``decaying`` and ``adaptive``
schedules; 4312a64 removed them and the release keeps ``fixed`` only), ``src/models/deploying_t5.py``:
``func_inverse`` (750-751), the schedule at each check (1001-1013: ``k = config.k if config.k else
func_inverse(i, ...)`` at the first check, ``func_inverse(i, 35000, 250, L)`` or ``int(k * (1 - conf * 0.9))``
after it), and ``src/util/skip_conf.py@7289604:10-16`` (the next candidates are the top-k of the logits just
scored, mapped through the current candidate ids). The FLOPs count is the release's ``deploying_t5.py:889-895``.

Layers are counted as the authors' loop index i: the check at i reads the state after i layers (effllm's 1-based
candidate layer). A check at layer i scores the rows picked at the previous check, then picks the next ones:

- ``fixed``: k rows every time.
- ``decaying``: k_i = max(250, int(35000 / (1 + (35000 - 250) / 250 * i / L))); at the first check k (if given)
  or k_i.
- ``adaptive``: k_i = int(k_{i-1} (1 - 0.9 c_{i-1})) from the previous check's confidence, starting from k (if
  given) or the decaying k at the first check.

Where the authors' code would fail, effllm keeps going and says so here: a size above the rows in hand (a decaying
k_i above a given k: ``torch.topk`` raises upstream) is capped at those rows; an adaptive size below 2 (the softmax
gap needs two rows; upstream it raises) is floored at 2.
"""

from __future__ import annotations

K_MAX = 35000  # maximum_k_size (deploying_t5.py@7289604:867)
K_MIN = 250  # minimum_k_size (deploying_t5.py@7289604:868)
CONFIDENCE_SCALING = 0.9  # conf_scaling_factor (deploying_t5.py@7289604:872)
MIN_ROWS = 2  # the softmax confidence is a gap between the two best rows


def decaying_size(layer: int, n_layers: int, k_max: int = K_MAX, k_min: int = K_MIN) -> int:
    """``func_inverse(i, k1, k2, L) = max(k2, int(k1 / (1 + (k1 - k2) / k2 * i / L)))``."""
    return max(k_min, int(k_max / (1 + (k_max - k_min) / k_min * layer / n_layers)))


def adaptive_size(previous: int, confidence: float, scaling: float = CONFIDENCE_SCALING) -> int:
    """``int(k * (1 - conf * 0.9))`` of the previous size and confidence, floored at 2 rows."""
    return max(MIN_ROWS, int(previous * (1 - confidence * scaling)))


def first_size(schedule: str, k: int | None, layer: int, n_layers: int, k_max: int = K_MAX,
               k_min: int = K_MIN) -> int:
    """Candidates picked at the first check (``config.k if config.k else func_inverse(i, ...)``)."""
    if k is not None:
        return k
    if schedule == "fixed":
        raise ValueError("type_vocab_reduct='fixed' needs k (the number of candidate ids kept)")
    return decaying_size(layer, n_layers, k_max, k_min)


def next_size(schedule: str, k: int | None, layer: int, n_layers: int, previous: int, confidence: float,
              k_max: int = K_MAX, k_min: int = K_MIN) -> int:
    """Candidates picked at a later check at ``layer`` (before the cap at the rows in hand)."""
    if schedule == "fixed":
        return k
    if schedule == "decaying":
        return decaying_size(layer, n_layers, k_max, k_min)
    return adaptive_size(previous, confidence)


def head_flops_per_block(hidden_size: int, rows_per_block: list[int]) -> int:
    """The authors' FLOPs count of one token (release ``deploying_t5.py:889-895``): (2d - 1) times the vocabulary
    for every block up to and including the first check, and (2d - 1) times the rows in hand for each later block run
    (``rows_per_block``: what each block run was charged, the exit block included)."""
    return (2 * hidden_size - 1) * sum(rows_per_block)
