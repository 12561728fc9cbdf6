"""effllm.frontier: Pareto front against brute force, FLOPs per token against a hand count."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from effllm import exits, frontier
from effllm.models import tiny_model


def brute_force_front(cost, quality):
    """Row i is on the front unless some row j is <= on cost, >= on quality and strictly better on one."""
    n = len(cost)
    keep = []
    for i in range(n):
        if np.isnan(cost[i]) or np.isnan(quality[i]):
            keep.append(False)
            continue
        dominated = any(
            not (np.isnan(cost[j]) or np.isnan(quality[j]))
            and cost[j] <= cost[i] and quality[j] >= quality[i] and (cost[j] < cost[i] or quality[j] > quality[i])
            for j in range(n)
        )
        keep.append(not dominated)
    return keep


@pytest.mark.parametrize("seed", range(25))
def test_pareto_front_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    # Few distinct values: ties on cost, on quality and exact duplicates all occur.
    cost = rng.integers(0, 6, n).astype(float)
    quality = rng.integers(0, 6, n).astype(float)
    cost[rng.random(n) < 0.1] = np.nan
    table = pd.DataFrame({"cost": cost, "quality": quality}, index=rng.permutation(n) + 100)
    got = frontier.pareto_front(table, "cost", "quality")
    assert got.tolist() == brute_force_front(cost, quality)
    assert list(got.index) == list(table.index)
    # A benefit as the cost axis, a loss as the quality axis: the same front as the negated columns.
    flipped = frontier.pareto_front(table.assign(cost=-cost, quality=-quality), "cost", "quality",
                                    minimize_cost=False, maximize_quality=False)
    assert flipped.tolist() == got.tolist()


def test_pareto_front_rejects_unknown_column():
    with pytest.raises(ValueError, match="no column 'speed'"):
        frontier.pareto_front(pd.DataFrame({"cost": [1.0], "quality": [1.0]}), "speed", "quality")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_model("llama")  # d 64, 4 heads of 16, 2 KV heads, MLP 128, vocab 384, 4 layers
    return model.eval(), tokenizer


def hand_count_layer(context):
    d, kv, ff, heads, head_dim = 64, 32, 128, 4, 16
    weights = d * d + d * kv + d * kv + d * d + 3 * d * ff  # q, k, v, o; gate, up, down
    return 2 * weights + 4 * heads * head_dim * context


def test_flops_per_token_matches_hand_count(tiny):
    model, _ = tiny
    head = 2 * 384 * 64
    assert frontier.flops_per_token(model, context_len=10) == 4 * hand_count_layer(10) + head
    assert frontier.flops_per_token(model, context_len=1, layers=[0, 2]) == 2 * hand_count_layer(1) + head
    with pytest.raises(ValueError, match="context_len"):
        frontier.flops_per_token(model, context_len=0)
    with pytest.raises(ValueError, match="0-based indices below 4"):
        frontier.flops_per_token(model, context_len=4, layers=[4])


def test_nonzero_flops_of_a_pruned_model(tiny):
    model, _ = tiny
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.model.layers[1].mlp.up_proj.weight[:, :32] = 0  # 128 x 32 weights removed
    assert frontier.layer_flops(pruned, 1, 5) == hand_count_layer(5)
    assert frontier.layer_flops(pruned, 1, 5, nonzero_only=True) == hand_count_layer(5) - 2 * 128 * 32


def test_parameter_count_counts_tied_weights_once(tiny):
    model, _ = tiny
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert frontier.parameter_count(model) == sum(p.numel() for p in model.parameters())
    assert frontier.parameter_count(model) == 384 * 64 + 4 * (hand_count_layer(0) // 2 + 2 * 64) + 64


def test_decode_flops_full_static_and_skip(tiny):
    model, _ = tiny
    prompts = [torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])]
    new = 4
    head = 2 * 384 * 64
    # Decode step j of a prompt of length p attends to p + j positions.
    expected_full = np.mean([4 * hand_count_layer(p + j) + head for p in (3, 2) for j in range(1, new)])
    full = [exits.generate(model, ids, new, method="full", eos_token_id=[]) for ids in prompts]
    assert frontier.decode_flops(model, full, prompts) == pytest.approx(expected_full)
    static = [exits.generate(model, ids, new, method="static", static_exit_layer=2, eos_token_id=[])
              for ids in prompts]
    kv = 2 * (64 * 32 + 64 * 32)
    expected_static = np.mean([2 * hand_count_layer(p + j) + 2 * kv + head for p in (3, 2) for j in range(1, new)])
    assert frontier.decode_flops(model, static, prompts, kv_policy="propagate") == pytest.approx(expected_static)
    assert frontier.decode_flops(model, static, prompts, kv_policy="deferred") == pytest.approx(expected_full)
    skip = [exits.generate(model, ids, new, method="skip", skip_mode="static", skip_pattern=[0, 3], eos_token_id=[])
            for ids in prompts]
    assert frontier.decode_flops(model, skip, prompts, kv_policy="none") == pytest.approx(
        np.mean([2 * hand_count_layer(p + j) + head for p in (3, 2) for j in range(1, new)]))
    with pytest.raises(ValueError, match="unknown kv_policy"):
        frontier.decode_flops(model, full, prompts, kv_policy="free")


def test_decode_flops_of_calm_exits_pay_checks_not_the_head(tiny):
    model, _ = tiny
    prompts = [torch.tensor([[5, 6, 7]])]
    # Threshold 0: every decode step exits at the first checked layer (exit_min_layer 2), after one check.
    calm = [exits.generate(model, prompts[0], 4, method="calm", exit_min_layer=2, exit_conf_threshold=0.0,
                           eos_token_id=[])]
    assert calm[0].exit_layers[0, 1:].tolist() == [2, 2, 2]
    kv = 2 * (64 * 32 + 64 * 32)
    checks = [calm[0].confidence_flops[j] for j in range(1, 4)]
    assert all(c > 0 for c in checks)
    expected = np.mean([2 * hand_count_layer(3 + j) + 2 * kv + checks[j - 1] + 100 for j in range(1, 4)])
    assert frontier.decode_flops(model, calm, prompts, transform_flops_per_check=100) == pytest.approx(expected)
