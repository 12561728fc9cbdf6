"""Learn-then-Test: the p-values against their formulas, the fixed-sequence procedure, and its guarantee."""

import math
import random

import pytest
import torch

from effllm import ltt
from effllm.decoding import Calm, Free, StaticExit
from effllm.models import tiny_model


def test_binomial_cdf_equals_the_sum_of_the_pmf():
    for n, p in [(10, 0.3), (40, 0.05), (7, 0.9)]:
        for k in range(-1, n + 1):
            brute = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))
            assert ltt.binomial_cdf(k, n, p) == pytest.approx(min(brute, 1.0), rel=1e-9, abs=1e-15)


def test_hoeffding_bentkus_p_value():
    # zero empirical risk: the Hoeffding term is exp(-n KL(0 || delta)) = (1 - delta)^n, Bentkus e times that
    assert ltt.hoeffding_bentkus_p_value(0.0, 0.2, 100) == pytest.approx(0.8**100, rel=1e-6)
    # empirical risk at or above delta: no evidence at all
    assert ltt.hoeffding_bentkus_p_value(0.2, 0.2, 100) == pytest.approx(1.0)
    assert ltt.hoeffding_bentkus_p_value(0.5, 0.2, 100) == 1.0
    # more samples, same risk: smaller p-value
    assert ltt.hoeffding_bentkus_p_value(0.1, 0.2, 400) < ltt.hoeffding_bentkus_p_value(0.1, 0.2, 100)
    with pytest.raises(ValueError, match="delta must lie in"):
        ltt.hoeffding_bentkus_p_value(0.1, 1.5, 10)


def test_fixed_sequence_stops_at_the_first_failure():
    n = 200
    risks = {0.95: [0.0] * n, 0.9: [0.0] * 190 + [1.0] * 10, 0.8: [1.0] * 100 + [0.0] * 100, 0.7: [0.0] * n}
    result = ltt.learn_then_test(risks, delta=0.2, epsilon=0.05)
    # 0.8 fails (risk 0.5), so 0.7 is never tested although its empirical risk is 0
    assert result.threshold == 0.9
    table = result.table.set_index("candidate")
    assert table.loc[0.95, "certified"] and table.loc[0.9, "certified"]
    assert not table.loc[0.8, "certified"] and not table.loc[0.7, "tested"]


def test_learn_then_test_controls_the_risk():
    """Losses whose true mean exceeds delta are certified in at most an epsilon fraction of trials."""
    rng = random.Random(0)
    delta, epsilon, n, trials = 0.2, 0.1, 60, 2000
    certified = 0
    for _ in range(trials):
        losses = [float(rng.random() < 0.22) for _ in range(n)]  # true risk 0.22 > delta
        certified += ltt.learn_then_test({0.5: losses}, delta, epsilon).threshold is not None
    assert certified / trials <= epsilon
    # and a clearly safe threshold is certified
    safe = [float(rng.random() < 0.02) for _ in range(n)]
    assert ltt.learn_then_test({0.5: safe}, delta, epsilon).threshold == 0.5


def test_disagreement():
    a, b = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 9, 4, 5])
    assert ltt.disagreement(a, b) == pytest.approx(1 - 3 / 5)
    assert ltt.disagreement(a, a) == 0.0
    with pytest.raises(ValueError, match="allowed: token, rougeL"):
        ltt.disagreement(a, b, distance="bleu")


def test_calibrate_threshold_on_a_tiny_model():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    prompts = [torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(s)) for s in range(5)]
    result = ltt.calibrate_threshold(model, prompts, 8, candidates=[2.0, 0.5, 0.0], delta=0.5, epsilon=0.1,
                                     policy=Calm(exit_min_layer=2), eos_token_id=[], progress=False)
    table = result.table.set_index("candidate")
    # a threshold no confidence reaches never exits: zero disagreement, certified with 5 prompts (0.5^5 < 0.1)
    assert table.loc[2.0, "risk"] == 0.0 and table.loc[2.0, "certified"]
    assert table.loc[2.0, "avg_layers"] == 6.0 and table.loc[0.0, "avg_layers"] < 6.0
    assert result.threshold in (2.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="a Calm or Free policy"):
        ltt.calibrate_threshold(model, prompts, 8, [0.9], 0.2, 0.1, policy=StaticExit(3))


def test_calibrate_threshold_on_t5_compares_the_generated_tokens(monkeypatch):
    """On T5 the prompt is the encoder input: the risk compares the decoder's new tokens, however long the source
    is (cutting at the source length once left nothing to compare and certified every threshold)."""
    model, _ = tiny_model("t5", num_layers=4)
    prompts = [torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(s)) for s in range(5)]
    compared = []
    original = ltt.disagreement

    def recording(early, full, *args):
        compared.append((len(early), len(full)))
        return original(early, full, *args)

    monkeypatch.setattr(ltt, "disagreement", recording)
    result = ltt.calibrate_threshold(model, prompts, 6, candidates=[2.0, 0.0], delta=0.5, epsilon=0.1,
                                     policy=Free(shallow_exit_layer=1), distance="token", eos_token_id=[],
                                     progress=False)
    assert compared and all(pair == (6, 6) for pair in compared)  # 6 new tokens each, source of 12
    table = result.table.set_index("candidate")
    assert table.loc[2.0, "risk"] == 0.0 and table.loc[2.0, "avg_layers"] == 4.0
    assert table.loc[0.0, "avg_layers"] < 4.0


def test_n_to_certify_is_the_first_n_a_scan_certifies():
    """Against a straight scan over n: the p-value at the returned n is <= epsilon and at n - 1 it is not."""
    from effllm.ltt import hoeffding_bentkus_p_value, n_to_certify

    assert n_to_certify(0.0, 0.25, 0.1) == 9  # 0.75^8 = 0.1001 > 0.1 >= 0.75^9: n = 8 certifies nothing
    for risk, delta, epsilon in ((0.0, 0.25, 0.1), (0.05, 0.25, 0.1), (0.1, 0.2, 0.05), (0.18, 0.2, 0.1)):
        n = int(n_to_certify(risk, delta, epsilon))
        scan = next(m for m in range(1, 100_000) if hoeffding_bentkus_p_value(risk, delta, m) <= epsilon)
        assert n == scan, (risk, delta, epsilon)
    assert n_to_certify(0.25, 0.25, 0.1) == float("inf") and n_to_certify(0.3, 0.25, 0.1) == float("inf")
