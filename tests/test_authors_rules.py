"""Mechanisms tied to the authors' code on small seeded inputs (issue 31).

Each reference below is written from a reading of the authors' files (cited per test), as plain Python, independent
of the implementation under test.
"""

import math

import numpy as np
import pytest

from effllm.decoding import vocab_schedule
from effllm.decoding.adaptive_threshold import AdaptiveThreshold


def _beta_pdf(x, a, b):
    if not (a > 0 and b > 0) or math.isinf(a) or math.isinf(b):
        return math.nan
    return math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a)
                    - math.lgamma(b))


def _reference_threshold(confidences, agreed, zeta=0.4):
    """fast_robust_early_exit util/bmm.py:10-15 (moments, population variance), 49-59 (responsibilities: 0.2 x
    one-hot, floored at 1e-4, columns normalised), 68-70 (clip), 110-116 (count rule on linspace(0.3, 0.9, 10))."""
    x = [min(max(c, 1e-4), 1 - 1e-4) for c in confidences]
    params = []
    for cls in (0, 1):
        w = []
        for a in agreed:
            own, other = 0.2, 1e-4  # the label's entry and the floored other entry
            mine = own if int(a) == cls else other
            w.append(mine / (own + other + 1e-12))
        m = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / sum(w)
        s2 = sum(wi * (xi - m) ** 2 for wi, xi in zip(w, x, strict=True)) / sum(w)
        alpha = m * ((m * (1 - m)) / s2 - 1) if s2 > 0 else math.inf
        params.append((alpha, alpha * (1 - m) / m))
    means = [a / (a + b) if math.isfinite(a) else math.nan for a, b in params]
    i = 1 if (not math.isnan(means[1]) and (math.isnan(means[0]) or means[1] > means[0])) else 0
    grid = [0.3 + (0.9 - 0.3) * j / 9 for j in range(10)]
    count = 0
    for g in grid:
        li, lj = _beta_pdf(g, *params[i]), _beta_pdf(g, *params[1 - i])
        ratio = li / (li + lj) if not (math.isnan(li) or math.isnan(lj)) and li + lj > 0 else math.nan
        count += bool(ratio > zeta)
    return grid[min(max(0, 10 - count), 9)]


def _stream(seed, sequences=6, passes=3):
    """Sequences of synchronized passes: each pass 1-3 tokens of (confidence, agreed); the first sequence agrees only."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(sequences):
        seq = []
        for _ in range(passes):
            n = int(rng.integers(1, 4))
            agreed = rng.random(n) < 0.6
            if s == 0:
                agreed[:] = True
            conf = np.where(agreed, rng.beta(5, 2, n), rng.beta(2, 4, n))
            seq.append((conf.tolist(), agreed.tolist()))
        out.append(seq)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_free_adaptive_threshold_follows_the_authors_fit_per_sequence(seed):
    """deploying_t5.py:898-906 (record every stacked token and the current one at a synchronized pass),
    1208-1214 (fit once at the start of each new sequence on everything so far): the threshold never moves inside a
    sequence, a one-class first sequence drops it to 0.3, and each later value is the reference fit."""
    estimator = AdaptiveThreshold(initial=0.9)
    seen_c, seen_a, expected, got = [], [], [], []
    for s, sequence in enumerate(_stream(seed)):
        estimator.start_sequence()
        if s == 0:
            assert estimator.threshold == 0.9  # nothing recorded yet: the policy's threshold
        else:
            expected.append(_reference_threshold(seen_c, seen_a))
            got.append(estimator.threshold)
        at_start = estimator.threshold
        for conf, agreed in sequence:
            estimator.record(conf, agreed)
            seen_c += conf
            seen_a += agreed
            assert estimator.threshold == at_start  # no mid-sequence refit
    assert got[0] == pytest.approx(0.3)  # fitted on one class only
    assert got == pytest.approx(expected, abs=1e-12)
    assert len(set(round(g, 6) for g in got)) > 1  # the stream moves it: a check that could fail
    assert [h[0] for h in estimator.history] == list(range(2, 7))


def test_free_adaptive_threshold_has_no_class_prior_and_stops_after_max_fits():
    """bmm.py:110-116 uses the component likelihoods only (the mixing weights never enter): repeating the agreeing
    observations ten times changes the fitted Betas' weights, not the threshold; after max_fits fits it is frozen."""
    agree = [0.95, 0.9, 0.85, 0.8, 0.7]
    disagree = [0.2, 0.3, 0.4, 0.5, 0.35]
    few, many = AdaptiveThreshold(), AdaptiveThreshold()
    few.record(agree + disagree, [True] * 5 + [False] * 5)
    many.record(agree * 10 + disagree, [True] * 50 + [False] * 5)
    few.start_sequence()
    many.start_sequence()
    assert few.threshold == pytest.approx(many.threshold)
    assert few.threshold == pytest.approx(_reference_threshold(agree + disagree, [True] * 5 + [False] * 5))
    frozen = AdaptiveThreshold(max_fits=1)
    frozen.record(agree + disagree, [True] * 5 + [False] * 5)
    frozen.start_sequence()
    first = frozen.threshold
    frozen.record([0.99] * 20, [False] * 20)
    frozen.start_sequence()
    assert frozen.frozen and frozen.threshold == first


def test_free_adaptive_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="one agreement per confidence"):
        AdaptiveThreshold().record([0.5, 0.6], [True])
    with pytest.raises(ValueError, match="grid"):
        AdaptiveThreshold(grid=(0.9, 0.3, 10))


# --- vocabulary schedules (MatteoNulli/Vocabulary_pruning @7289604, src/models/deploying_t5.py:750-751, 1001-1013)

def _reference_rows(schedule, k, first_check, n_layers, vocab, confidences):
    """Rows each check scores, read from deploying_t5.py@7289604:1001-1013 (k is updated before the rows picked at
    the previous check are scored, so check i scores k_{i-1}); sizes above the rows in hand capped, below 2 floored."""
    rows, scored = vocab, []
    current_k = None
    for i in range(first_check, n_layers):
        scored.append(rows)
        if i == first_check:
            current_k = k if k else max(250, int(35000 / (1 + (35000 - 250) / 250 * i / n_layers)))
        elif schedule == "decaying":
            current_k = max(250, int(35000 / (1 + (35000 - 250) / 250 * i / n_layers)))
        elif schedule == "adaptive":
            current_k = max(2, int(current_k * (1 - confidences[i - first_check - 1] * 0.9)))
        rows = min(current_k, rows)
    return scored


@pytest.mark.parametrize("first_check", [7, 19])
def test_decaying_sizes_are_the_authors(first_check):
    """func_inverse with 35000 and 250: at exit_min_layer 7 of 24 layers layers 8, 9, 10 score 842, 739, 658 rows."""
    sizes = [vocab_schedule.decaying_size(i, 24) for i in range(first_check, 24)]
    expected = [max(250, int(35000 / (1 + 139 * i / 24))) for i in range(first_check, 24)]
    assert sizes == expected
    if first_check == 7:
        assert sizes[:3] == [842, 739, 658]
    assert vocab_schedule.first_size("decaying", None, first_check, 24) == sizes[0]
    assert vocab_schedule.first_size("decaying", 256, first_check, 24) == 256


def test_adaptive_size_floors_at_two_rows():
    assert vocab_schedule.adaptive_size(256, 0.5) == int(256 * (1 - 0.45))
    assert vocab_schedule.adaptive_size(3, 0.99) == 2
    assert _reference_rows("adaptive", 256, 7, 24, 32128, [0.5] * 17)[:3] == [32128, 256, int(256 * 0.55)]


def test_free_records_every_stacked_token_at_a_synchronized_pass():
    """deploying_t5.py:898-906: a deep token with shallow-exited tokens stacked before it records them all and itself;
    a deep token with nothing stacked records nothing. Counted from the decode's own exit layers."""
    import torch

    from effllm.decoding import Free, decode
    from effllm.models import tiny_model

    model, _ = tiny_model("llama", num_hidden_layers=6)
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(5))
    mixed = 0
    for threshold in (0.002, 0.0025, 0.003, 0.0035, 0.004):  # random tiny weights: confidences sit near 0.003
        estimator = AdaptiveThreshold(initial=threshold)
        out = decode(model, ids, 24, Free(3, threshold, use_adapt_threshold=True, adapt_threshold=estimator),
                     eos_token_id=[])
        expected, stacked = 0, 0
        for layer in out.exit_layers[0, 1:].tolist():  # token 0 comes from the prompt pass
            if layer == 3:
                stacked += 1
            else:
                expected += stacked + 1 if stacked else 0
                stacked = 0
        mixed += expected > 0
        assert len(estimator.confidences) == expected == len(estimator.agreed)
        assert estimator.fits == 0 and estimator.threshold == threshold  # one sequence: no refit inside it
    assert mixed  # some setting mixes shallow and deep tokens


class _Head24:
    """A 24-layer head of 32128 rows: logits from a fixed random table, so every check's confidence is known."""

    num_layers, vocab_size, hidden_size = 24, 32128, 8

    def __init__(self):
        import torch

        self.table = torch.randn(self.vocab_size, generator=torch.Generator().manual_seed(0)) * 4
        self.scored = []

    def logits(self, hidden, rows=None):
        self.scored.append(self.vocab_size if rows is None else int(rows.shape[0]))
        values = self.table if rows is None else self.table[rows]
        return values.view(1, 1, -1)


@pytest.mark.parametrize("schedule", ["decaying", "adaptive"])
@pytest.mark.parametrize("first_check", [7, 19])
@pytest.mark.parametrize("k", [256, None])
def test_exit_head_scores_the_rows_the_authors_code_scores(schedule, first_check, k):
    """deploying_t5.py@7289604:1001-1013 and skip_conf.py@7289604:10-16, through effllm's ExitHead: the rows each
    check from exit_min_layer on scores, against the reference reading above (k = 256 and k unset)."""
    import torch

    from effllm.decoding.exits import ExitHead
    from effllm.decoding.policies import VocabPruning

    adapter = _Head24()
    head = ExitHead(adapter, vocab=VocabPruning(schedule, k), candidate_layer=first_check)
    head.new_token()
    confidences = []
    for layer in range(first_check, 24):
        confidence, _ = head.confidence(layer, torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))
        confidences.append(confidence)
    assert adapter.scored == _reference_rows(schedule, k, first_check, 24, 32128, confidences)
    if schedule == "decaying" and k is None and first_check == 7:
        assert adapter.scored[1:4] == [842, 739, 658]


def test_meta_loss_is_the_authors_balanced_logit_adjusted_cross_entropy():
    """util/losses.py:154-158: bal_prior = log([neg, pos]); CrossEntropyLoss()(preds + bal_prior, labels)."""
    import torch

    from effllm.lens import MetaClassifier, _meta_loss

    torch.manual_seed(1)
    head = MetaClassifier(4, 3)
    x, y = torch.randn(10, 4), torch.tensor([1, 1, 1, 0, 1, 1, 0, 1, 1, 1]).float()
    pos = float(y.mean())
    adjustment = torch.log(torch.tensor([1 - pos, pos]))
    z = head.net(x) + adjustment
    by_hand = -sum(float(torch.log_softmax(z[i], -1)[int(y[i])]) for i in range(10)) / 10
    assert float(_meta_loss(head, x, y, torch.zeros(10, dtype=torch.long), adjustment)) == pytest.approx(by_hand)


def test_a_free_policy_keeps_one_estimator_across_the_sequences_it_decodes():
    """deploying_t5.py:1047-1049, 1208-1214: the estimator lives on the model object for the whole evaluation set;
    here on the policy object, so the second sequence is decoded at the threshold the first one gave."""
    import torch

    from effllm.decoding import Free, decode
    from effllm.models import tiny_model

    model, _ = tiny_model("llama", num_hidden_layers=6)
    policy = Free(3, 0.003, use_adapt_threshold=True)
    assert isinstance(policy.adapt_threshold, AdaptiveThreshold) and policy.adapt_threshold.threshold == 0.003
    for seed in range(4):
        ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(seed))
        decode(model, ids, 24, policy, eos_token_id=[])
    estimator = policy.adapt_threshold
    assert estimator.sequences == 4 and len(estimator.confidences) > 0
    assert estimator.fits >= 1 and estimator.history[0][0] >= 2  # refitted at a later sequence's start
    assert Free(3, use_adapt_threshold=True).adapt_threshold is not Free(3, use_adapt_threshold=True).adapt_threshold
