"""Layer skipping (effllm.decoding.skipping, effllm.controllers, effllm.oracle) against references: HF `generate`, models built from the kept layers,
teacher-forced passes, a per-layer subsequence recomputation for left-out K/V, and brute force for the
oracle's knapsack."""

import copy
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from effllm import controllers as ctl
from effllm import exits, oracle, records
from effllm.adapters import get_adapter
from effllm.bench import early_exit
from effllm.decoding import Skip, decode, plans
from effllm.decoding.policies import SKIPPED_KV
from effllm.experiments import analyses
from effllm.experiments.prompts import task_prompts
from effllm.experiments.runs import run_policies
from effllm.models import fingerprint, tiny_model

FAMILIES = ["llama", "opt", "gpt2"]


def _skip(model, ids, max_new_tokens, **options):
    return exits.generate(model, ids, max_new_tokens, method="skip", **options)


def _model(family, n_layers=6, seed=0):
    """A tiny random model whose greedy outputs vary from token to token (the default init repeats one token)."""
    depth = {"n_layer": n_layers} if family == "gpt2" else {"num_hidden_layers": n_layers}
    model, _ = tiny_model(family, seed=seed, initializer_range=0.3, **depth)
    return model


def _prompt(seed=0, length=7):
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, ids, max_new_tokens, eos=2):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos if eos is not None else 0)


def _reduced_copy(model, kept):
    """A deep copy with only the ``kept`` layers in its ModuleList, renumbered for the KV cache."""
    reduced = copy.deepcopy(model)
    records.ADAPTER.set(reduced, None)
    adapter = get_adapter(reduced)
    layers = adapter.layers
    new_layers = torch.nn.ModuleList(layers[i] for i in kept)
    for j, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j  # the cache slot this attention writes to
    parent_path, _, name = adapter.layers_path.rpartition(".")
    setattr(reduced.get_submodule(parent_path), name, new_layers)
    reduced.config.num_hidden_layers = len(kept)
    if getattr(reduced.config, "layer_types", None) is not None:
        reduced.config.layer_types = [reduced.config.layer_types[i] for i in kept]
    return reduced


def _keep_matrix(out, n_layers, prompt_len):
    """[L, 1, S] keep flags of every position of out.sequences: the prompt runs every layer, the token fed
    at position prompt_len + k - 1 ran out.layers_run[k]; the last token is never fed (kept: unused)."""
    length = out.sequences.shape[1]
    keep = torch.ones(n_layers, 1, length)
    for k in range(1, len(out.layers_run)):
        keep[:, 0, prompt_len + k - 1] = 0
        keep[list(out.layers_run[k]), 0, prompt_len + k - 1] = 1
    return keep


def _predicted(model, hidden, prompt_len, n_new):
    """Greedy tokens read from states of the whole sequence: position prompt_len - 1 + k predicts new token k."""
    logits = get_adapter(model).logits(hidden)
    return logits[0, prompt_len - 1 : prompt_len - 1 + n_new].argmax(-1)


# ---- nothing skipped -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_nothing_equals_hf_generate(family):
    model = _model(family)
    ids = _prompt(1)
    expected = _hf_greedy(model, ids, 20)
    n_layers = get_adapter(model).num_layers
    for params in [{}, {"budget": 1.0}, {"skip_pattern": list(range(n_layers))}, {"skip_pattern": "every-1"},
                   {"skip_mode": "early-exit", "budget": 1.0}, {"skip_mode": "random", "budget": 1.0}]:
        for skipped_kv in SKIPPED_KV:
            out = _skip(model, ids, 20, eos_token_id=2, skipped_kv=skipped_kv, **params)
            assert torch.equal(out.sequences, expected), params
            assert (out.exit_layers == n_layers).all()
            assert all(run == tuple(range(n_layers)) for run in out.layers_run)
    assert len(set(expected[0, 7:].tolist())) > 5  # the reference is not a degenerate repetition


def test_output_is_an_exit_output_with_per_token_layers():
    model = _model("llama")
    out = _skip(model, _prompt(2), 6, skip_pattern="every-2", eos_token_id=[])
    assert isinstance(out, exits.ExitOutput)
    assert out.layers_run == [tuple(range(6))] + [(0, 2, 4, 5)] * 5
    assert out.num_layers_run.tolist() == [[6, 4, 4, 4, 4, 4]]
    assert out.exit_layers.tolist() == [[6] * 6]  # every-2 keeps the last layer: the head reads layer 6
    assert out.num_layers == 6 and math.isclose(out.layer_fraction, (6 + 5 * 4) / 6 / 6)


# ---- static patterns and early exit -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kept", [[0, 2, 5], [1, 3], [4]])
def test_static_pattern_equals_a_model_built_from_the_kept_layers(family, kept):
    model = _model(family)
    reduced = _reduced_copy(model, kept)
    ids = _prompt(3)
    expected = _hf_greedy(reduced, ids, 16)
    for skipped_kv in SKIPPED_KV:
        out = _skip(model, ids, 16, skip_pattern=kept, skip_prompt=True, skipped_kv=skipped_kv,
                                eos_token_id=2)
        assert torch.equal(out.sequences, expected)
        assert (out.num_layers_run == len(kept)).all()


def test_every_k_and_budget_patterns():
    assert plans.static_layers(24, "every-6") == [0, 6, 12, 18, 23]
    assert plans.static_layers(30, "every-2") == [*range(0, 30, 2), 29]
    assert plans.static_layers(30, budget=8 / 24) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    for n_layers in (4, 24, 30):
        for b in plans.PAPER_BUDGETS:
            kept = plans.static_layers(n_layers, budget=b)
            assert len(kept) == len(set(kept)) == plans.budget_layer_count(n_layers, b)
            assert kept[0] == 0 and (kept[-1] == n_layers - 1 or len(kept) == 1)
    assert [plans.budget_layer_count(30, b) for b in plans.PAPER_BUDGETS] == [5, 10, 15, 30]
    assert plans.early_exit_layers(30, 0.5) == list(range(15))


def test_static_pattern_with_full_depth_prompt_equals_teacher_forcing():
    """Prompt at all layers, new tokens through the kept layers: continuation_states gives the same tokens."""
    model = _model("llama")
    ids = _prompt(4)
    kept = [0, 3, 5]
    out = _skip(model, ids, 12, skip_pattern=kept, eos_token_id=[])
    hidden = analyses.continuation_states(model, out.sequences[:, :-1], 7, kept)
    predicted = get_adapter(model).logits(hidden)[0].argmax(-1)
    assert torch.equal(predicted, out.sequences[0, 8:])


@pytest.mark.parametrize("family", FAMILIES)
def test_early_exit_as_skipping_equals_the_exit_engine(family):
    model = _model(family)
    ids = _prompt(5)
    for budget, depth in [(0.5, 3), (1 / 6, 1)]:
        out = _skip(model, ids, 12, skip_mode="early-exit", budget=budget, skip_prompt=True, eos_token_id=2)
        reference = exits.generate(model, ids, 12, method="static", static_exit_layer=depth, eos_token_id=2)
        assert torch.equal(out.sequences, reference.sequences)
        assert out.layers_run[1:] == [tuple(range(depth))] * (len(out.layers_run) - 1)


# ---- dynamic skipping: K/V of skipped layers ------------------------------------------------------------


def test_mixed_forward_without_skips_equals_hf_forward():
    model = _model("llama")
    ids = _prompt(6, length=12)
    keep = torch.ones(6, 1, 12)
    hidden = ctl.mixed_forward(model, ids, keep)
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(get_adapter(model).logits(hidden), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_propagated_kv_equals_the_teacher_forced_mixed_pass(family):
    """skipped_kv='propagate': a skipped position's K/V at layer i come from its input state, which is what
    the parallel pass computes when it runs the layer and throws the output away."""
    model = _model(family)
    ids = _prompt(7)
    out = _skip(model, ids, 16, skip_mode="random", budget=0.5, skipped_kv="propagate", eos_token_id=[],
                            seed=3)
    assert len(set(out.layers_run[1:])) > 3  # routes differ from token to token
    with torch.no_grad():
        hidden = ctl.mixed_forward(model, out.sequences, _keep_matrix(out, 6, 7))
    assert torch.equal(_predicted(model, hidden, 7, 16), out.sequences[0, 7:])


def _subset_forward(model, sequence, positions_per_layer):
    """Reference for skipped_kv='none': layer i runs only on the positions where it ran, as one causal pass
    over that subsequence at their true positions; other positions carry their state past it."""
    adapter = get_adapter(model)
    length = sequence.shape[1]
    all_positions = torch.arange(length).unsqueeze(0)
    hidden = adapter.embed(sequence, position_ids=all_positions)
    for i in range(adapter.num_layers):
        where = torch.tensor(positions_per_layer[i])
        sub = hidden[:, where]
        # an explicit all-ones padding mask: position ids with gaps must not be read as packed sequences
        context = adapter.context(sub, position_ids=where.unsqueeze(0), attention_mask=torch.ones(1, len(where)))
        hidden = hidden.clone()
        hidden[:, where] = adapter.run_layer(i, sub, context)
    return hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_left_out_kv_attends_only_where_the_layer_ran(family):
    model = _model(family)
    ids = _prompt(8)
    out = _skip(model, ids, 16, skip_mode="random", budget=0.5, skipped_kv="none", eos_token_id=[], seed=3)
    propagated = _skip(model, ids, 16, skip_mode="random", budget=0.5, skipped_kv="propagate",
                                   eos_token_id=[], seed=3)
    assert out.layers_run == propagated.layers_run  # same routes: the seed, not the tokens, draws them
    assert not torch.equal(out.sequences, propagated.sequences)  # leaving K/V out changes what later tokens see
    positions = [[p for p in range(7)] for _ in range(6)]
    for k in range(1, len(out.layers_run)):
        for i in out.layers_run[k]:
            positions[i].append(7 + k - 1)
    with torch.no_grad():
        hidden = _subset_forward(model, out.sequences, positions)
    assert torch.equal(_predicted(model, hidden, 7, 16), out.sequences[0, 7:])


# ---- skipped layers are not computed --------------------------------------------------------------------


def _count_calls(model):
    adapter = get_adapter(model)
    calls = {}
    for i in range(adapter.num_layers):
        modules = {"attention": adapter.attention(i), "o": adapter.attention_projections(i)["o"],
                   "mlp_up": adapter.mlp_projections(i)["up"], "mlp_down": adapter.mlp_projections(i)["down"]}
        for role, module in modules.items():
            calls[(i, role)] = 0

            def hook(module, args, key=(i, role)):
                calls[key] += 1
            module.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["static", "random", "controller"])
def test_skipped_layers_are_never_called(family, mode, tmp_path):
    model = _model(family)
    params = {"static": {"skip_pattern": "every-2"}, "random": {"budget": 0.5}}.get(mode, {})
    if mode == "controller":
        controllers = ctl.SkipControllers(6, get_adapter(model).hidden_size, meta={
            "fingerprint": fingerprint(model)})
        params = {"controller": controllers}
    calls = _count_calls(model)
    out = _skip(model, _prompt(9), 12, skip_mode=mode, skipped_kv="propagate", eos_token_id=[], **params)
    for i in range(6):
        ran = sum(i in run for run in out.layers_run)  # the prompt pass counts once
        for role in ("attention", "o", "mlp_up", "mlp_down"):
            assert calls[(i, role)] == ran, (i, role)
    skipped = sum(6 - len(run) for run in out.layers_run)
    assert skipped >= 5  # something was skipped


# ---- controllers ----------------------------------------------------------------------------------------


def test_hard_gumbel_softmax_samples_the_softmax():
    logits = torch.tensor([[1.0, -0.5], [0.0, 0.0], [-2.0, 1.0]], requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([ctl.hard_gumbel_softmax(logits, generator=generator) for _ in range(20000)])
    assert torch.equal(samples.sum(-1), torch.ones(20000, 3))  # one-hot
    torch.testing.assert_close(samples.mean(0), torch.softmax(logits, -1), atol=0.015, rtol=0)
    samples[:, :, 0].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # straight-through gradient


def test_controller_training_lowers_the_cost_and_leaves_the_model_untouched(tmp_path):
    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    examples = []
    for seed in range(6):
        ids = _prompt(seed, length=14)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 6:] = True
        examples.append((ids, mask))
    controllers, history = ctl.train_controllers(model, examples, alpha=20.0, steps=40, lr=0.2,
                                                      model_name="tiny-llama", progress=False)
    assert history.layer_fraction.iloc[-10:].mean() < history.layer_fraction.iloc[:5].mean() - 0.2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags

    path = controllers.save(tmp_path / "controllers.safetensors")
    reloaded = ctl.SkipControllers.load(path, model)
    hidden = torch.randn(5, 64)
    for i in range(6):
        torch.testing.assert_close(reloaded.logits(i, hidden), controllers.logits(i, hidden))
    assert reloaded.meta["model"] == "tiny-llama"
    a = _skip(model, _prompt(1), 10, skip_mode="controller", controller=path, eos_token_id=[])
    b = _skip(model, _prompt(1), 10, skip_mode="controller", controller=controllers, eos_token_id=[])
    assert a.layers_run == b.layers_run and torch.equal(a.sequences, b.sequences)
    assert a.layer_fraction < 1.0


def test_fixed_input_controllers_ignore_the_state():
    controllers = ctl.SkipControllers(4, 16, with_fixed_input=True, init_keep_logit=1.0)
    h1, h2 = torch.randn(3, 16), torch.randn(3, 16) * 10
    for i in range(4):
        torch.testing.assert_close(controllers.logits(i, h1), controllers.logits(i, h2))
    # keep logit 1 from the bias; the weights start at std 1e-3, so the probability is sigmoid(1) +- 1e-3
    torch.testing.assert_close(controllers.keep_probabilities(), torch.full((4,), torch.sigmoid(torch.tensor(1.0)).item()),
                               atol=2e-3, rtol=0)


# ---- analyses -------------------------------------------------------------------------------------------


def test_hidden_similarity_is_one_at_full_depth_and_matches_hf_states():
    model = _model("llama")
    windows = torch.randint(3, 250, (3, 16), generator=torch.Generator().manual_seed(0))
    table = analyses.hidden_similarity(model, windows, prompt_len=5, layer_counts=[2, 6], progress=False)
    full = table[table.layers_run == 6]
    assert np.allclose(full.cosine, 1.0, atol=1e-5) and np.allclose(full.cosine_normed, 1.0, atol=1e-5)
    assert (table[table.layers_run == 2].cosine < 0.999).all()
    states = analyses.continuation_states(model, windows, 5, range(6))
    with torch.no_grad():
        expected = model(windows, output_hidden_states=True).hidden_states[-1][:, 5:]  # HF: after the final norm
    torch.testing.assert_close(get_adapter(model).normed(states), expected, rtol=1e-4, atol=1e-5)


def test_run_policies_bookkeeping_for_skipping():
    """The experiment layer on skip policies: every row decodes every prompt, layers per token are counted once
    (the first token from the full-depth prompt pass), and the references are exact."""
    model, tokenizer = tiny_model("llama")
    prompts = task_prompts(tokenizer, "arithmetic", 2, fmt="plain")
    settings = {"static 2/4": Skip("static", budget=0.5), "early exit 2/4": Skip("early-exit", budget=0.5),
                "random 2/4": Skip("random", budget=0.5)}
    run = run_policies(model, tokenizer, prompts, settings, 6, rounds=2, stop_at_eos=False, progress=False)
    items = run.items
    assert len(items) == 2 * (len(settings) + 2) and (items.new_tokens == 6).all()
    summary = run.summary.set_index("label")
    # 6 tokens: the first at all 4 layers, 5 at 2 layers
    for label in settings:
        assert summary.loc[label, "avg_layers"] == pytest.approx((4 + 5 * 2) / 6)
        assert summary.loc[label, "method"] == "skip" and summary.loc[label, "budget"] == 0.5
    assert summary.loc["full", "avg_layers"] == 4.0 and summary.loc["full", "rougeL_vs_full"] == 1.0
    assert summary.loc["hf_generate", "identical_to_full"] == 1.0  # HF generate and the engine agree
    assert summary.loc["static 2/4", "skip_mode"] == "static" and summary.loc["random 2/4", "skip_mode"] == "random"
    assert (summary.rounds == 2).all() and (summary.n_prompts == 2).all()
    assert run.timings.groupby(["label", "prompt"]).size().eq(2).all()  # each setting and prompt once per round
    assert (run.summary.decoded_to == "fixed length (end of sequence ignored)").all()


def test_default_benchmark_skip_rows_run_the_paper_budgets():
    settings = early_exit.default_settings(30)
    skips = {label: p for label, p in settings.items() if p.method == "skip"}
    assert list(skips) == ["skip@5/30", "skip@10/30", "skip@15/30"]
    model = _model("llama")
    for label, policy in early_exit.default_settings(6).items():
        if policy.method == "skip":
            out = decode(model, _prompt(0), 4, policy, eos_token_id=[])
            assert (out.num_layers_run[0, 1:] == plans.budget_layer_count(6, policy.budget)).all(), label


# ---- the oracle -----------------------------------------------------------------------------------------


def _brute_force(quality, costs, capacity):
    best = -np.inf
    for choice in itertools.product(range(quality.shape[1]), repeat=quality.shape[0]):
        if sum(costs[j] for j in choice) <= capacity:
            best = max(best, sum(quality[t, j] for t, j in enumerate(choice)))
    return best


def test_knapsack_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, m = rng.integers(1, 6), rng.integers(1, 5)
        quality = rng.random((n, m)).round(2)
        costs = rng.integers(0, 9, size=m)
        capacity = int(rng.integers(n * costs.min(), n * costs.max() + 1))
        solution = oracle.oracle_knapsack(quality, costs, capacity)
        assert math.isclose(solution.total_quality, _brute_force(quality, costs, capacity), abs_tol=1e-9)
        assert solution.total_cost == costs[solution.choice].sum() <= capacity
        assert math.isclose(quality[np.arange(n), solution.choice].sum(), solution.total_quality, abs_tol=1e-9)


def test_fraction_to_match_equals_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(1, 6))
        costs = np.array([4, 8, 12, 24])
        quality = rng.random((n, 4)).round(1)
        target = quality[:, -1].mean()
        expected = min(
            costs[list(choice)].mean() / 24
            for choice in itertools.product(range(4), repeat=n)
            if quality[np.arange(n), list(choice)].mean() >= target - 1e-12
        )
        assert math.isclose(oracle.oracle_fraction_to_match(quality, costs, target, 24), expected)
    frontier = oracle.oracle_frontier(quality, costs, 24)
    assert frontier.mean_quality.is_monotonic_increasing


def test_oracle_pairs_costs_and_qualities_by_label():
    """Columns in one order, costs in another: pairing by label gives the brute-force answer; pairing by position
    (the notebook bug that once read "needs all layers" as "needs half") gives another on this very case."""
    per_item = pd.DataFrame({"4/24": [0.2, 0.1, 0.0], "12/24": [0.6, 0.2, 0.1], "full": [0.7, 0.8, 0.9]})
    costs = {"full": 24, "4/24": 4, "12/24": 12}
    target = per_item["full"].mean()
    by_label = oracle.oracle_fraction_to_match(per_item, costs, target, 24)
    assert by_label == 1.0  # every sequence needs the full model to reach its mean here
    positional = oracle.oracle_fraction_to_match(per_item.to_numpy(), list(costs.values()), target, 24)
    assert positional != by_label  # the mispairing would change the verdict: the test would catch it
    frontier = oracle.oracle_frontier(per_item, costs, 24)
    assert frontier.layer_fraction.iloc[0] == pytest.approx(4 / 24)  # the cheapest choice is 4 layers each
    with pytest.raises(ValueError, match="pair by label"):
        oracle.oracle_frontier(per_item, [4, 12, 24], 24)
    with pytest.raises(ValueError, match="no cost for"):
        oracle.oracle_frontier(per_item, {"full": 24, "4/24": 4}, 24)


# ---- bad input ------------------------------------------------------------------------------------------


def test_bad_patterns_and_budgets_are_clear_errors():
    model = _model("llama")
    ids = _prompt(0)
    with pytest.raises(ValueError, match="drops every layer"):
        _skip(model, ids, 4, skip_pattern=[])
    with pytest.raises(ValueError, match="drops every layer"):
        _skip(model, ids, 4, skip_pattern=torch.tensor([], dtype=torch.long))
    for budget in (0, 0.0, -0.2, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"budget must be a fraction of the layers in \(0, 1\]"):
            _skip(model, ids, 4, budget=budget)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            _skip(model, ids, 4, skip_mode="random", budget=budget)
    with pytest.raises(ValueError, match=r"not layers of this model: allowed 0..5"):
        _skip(model, ids, 4, skip_pattern=[0, 6])
    with pytest.raises(ValueError, match="lists a layer twice"):
        _skip(model, ids, 4, skip_pattern=[1, 1])
    with pytest.raises(ValueError, match="'every-k'"):
        _skip(model, ids, 4, skip_pattern="every-other")
    with pytest.raises(ValueError, match=">= 1"):
        _skip(model, ids, 4, skip_pattern="every-0")
    with pytest.raises(ValueError, match="not both"):
        _skip(model, ids, 4, skip_pattern="every-2", budget=0.5)
    with pytest.raises(ValueError, match="unknown skip_mode 'skip'"):
        _skip(model, ids, 4, skip_mode="skip")
    with pytest.raises(ValueError, match="unknown skipped_kv"):
        _skip(model, ids, 4, skipped_kv="copy")
    with pytest.raises(ValueError, match="needs controller="):
        _skip(model, ids, 4, skip_mode="controller")
    with pytest.raises(ValueError, match="skip_prompt=True needs"):
        _skip(model, ids, 4, skip_mode="random", budget=0.5, skip_prompt=True)
    with pytest.raises(ValueError, match="capacity"):
        oracle.oracle_knapsack(np.ones((3, 2)), np.array([2, 4]), 5)


def test_controllers_for_another_model_are_a_clear_error(tmp_path):
    model = _model("llama")
    controllers = ctl.SkipControllers(6, 64, meta={"model": "tiny-llama seed 0",
                                                       "fingerprint": fingerprint(model)})
    path = controllers.save(tmp_path / "c.safetensors")
    other_weights = _model("llama", seed=1)
    with pytest.raises(ctl.ControllerMismatchError, match="tiny-llama seed 0.*same shape, other weights"):
        ctl.SkipControllers.load(path, other_weights)
    with pytest.raises(ctl.ControllerMismatchError, match="same shape, other weights"):
        _skip(other_weights, _prompt(0), 4, skip_mode="controller", controller=path)
    deeper = _model("llama", n_layers=8)
    with pytest.raises(ctl.ControllerMismatchError, match="6 layers of width 64.*8 layers of width 64"):
        _skip(deeper, _prompt(0), 4, skip_mode="controller", controller=controllers)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())
    ctl.SkipControllers.load(path, model)  # the right model loads
