"""The decoding engine against HF `generate`, and the exit bookkeeping."""

import math

import pytest
import torch

from effllm import exits
from effllm.adapters import get_adapter
from effllm.models import tiny_model

DECODER_FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "opt", "gpt2"]


def _hf_greedy(model, ids, max_new_tokens, eos):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos, pad_token_id=eos,
    )


def _prompt(seed, batch=1, length=7):
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("method", ["full", "calm"])
def test_exits_disabled_reproduce_hf_generate(family, method):
    model, _ = tiny_model(family)
    ids = _prompt(0)
    expected = _hf_greedy(model, ids, 20, eos=2)
    params = {"exit_conf_threshold": 1.5, "exit_min_layer": 1} if method == "calm" else {}
    for conf in ["softmax", "state"] if method == "calm" else ["softmax"]:
        out = exits.generate(model, ids, 20, method=method, eos_token_id=2, exit_conf_type=conf, **params)
        assert torch.equal(out.sequences, expected)
        assert (out.exit_layers == get_adapter(model).num_layers).all()


def test_full_depth_batch_matches_hf():
    model, _ = tiny_model("llama")
    ids = _prompt(1, batch=3)
    assert torch.equal(exits.generate(model, ids, 12, eos_token_id=[]).sequences,
                       _hf_greedy(model, ids, 12, eos=None))


def test_static_exit_equals_a_truncated_model():
    """Static exit at E = the first E layers, then the final norm and head, for every token."""
    model, _ = tiny_model("llama", num_hidden_layers=6)
    truncated, _ = tiny_model("llama", num_hidden_layers=6)
    truncated.model.layers = truncated.model.layers[:3]
    truncated.config.num_hidden_layers = 3
    ids = _prompt(2)
    out = exits.generate(model, ids, 15, method="static", static_exit_layer=3, eos_token_id=2)
    assert torch.equal(out.sequences, _hf_greedy(truncated, ids, 15, eos=2))
    assert (out.exit_layers == 3).all()


def test_calm_exits_at_the_first_confident_layer():
    """Threshold 0 exits at exit_min_layer on every token after the first; the token is that layer's argmax."""
    model, _ = tiny_model("llama", num_hidden_layers=6)
    adapter = get_adapter(model)
    ids = _prompt(3)
    out = exits.generate(model, ids, 6, method="calm", exit_conf_threshold=0.0, exit_min_layer=2, eos_token_id=[])
    assert out.exit_layers[0, 0] == 6 and (out.exit_layers[0, 1:] == 2).all()
    # recompute the second token by hand: prompt + first token through 2 layers (K/V of the prompt at full depth)
    cache = adapter.new_cache()
    adapter.forward(ids, cache=cache)
    hidden = adapter.embed(out.sequences[:, 7:8], cache=cache)
    context = adapter.context(hidden, cache=cache)
    for i in range(2):
        hidden = adapter.run_layer(i, hidden, context)
    assert adapter.logits(hidden).argmax(-1).item() == out.sequences[0, 8].item()


def test_state_propagation_fills_the_skipped_layers_cache():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    ids = _prompt(4)
    with_kv = exits.generate(model, ids, 8, method="calm", exit_conf_threshold=0.0, exit_min_layer=3, eos_token_id=[])
    without = exits.generate(model, ids, 8, method="calm", exit_conf_threshold=0.0, exit_min_layer=3,
                             eos_token_id=[], state_propagation=False)
    assert with_kv.sequences.shape == without.sequences.shape == (1, 15)
    assert (with_kv.exit_layers[0, 1:] == 3).all()


def test_decaying_threshold_formula():
    assert exits.decayed_threshold(0.9, 0, 64) == pytest.approx(0.9)
    assert exits.decayed_threshold(0.9, 32, 64) == pytest.approx(0.9 * (0.9 + 0.1 * math.exp(-2)))


def test_softmax_confidence_is_the_top2_gap():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert exits.softmax_confidence(logits).item() == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"method": "calm", "exit_conf_threshold": -0.1}, "exit_conf_threshold must be a number >= 0"),
        ({"method": "calm", "exit_conf_threshold": float("nan")}, "exit_conf_threshold must be a number >= 0"),
        ({"method": "static", "static_exit_layer": 5}, "static_exit_layer must be a layer between 1 and 4"),
        ({"method": "calm", "exit_min_layer": 0}, "exit_min_layer must be a layer between 1 and 4"),
        ({"method": "skip"}, "allowed: full, static, calm"),
        ({"method": "calm", "exit_conf_type": "meta"}, "allowed: softmax, state"),
    ],
)
def test_bad_input(params, match):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        exits.generate(model, _prompt(5), 4, **params)


def test_calm_needs_batch_one():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="batch 1"):
        exits.generate(model, _prompt(6, batch=2), 4, method="calm")


@pytest.mark.embedded
def test_embedded_model_full_and_disabled_calm_match_hf():
    from effllm.models import chat_input_ids, load_model

    model, tokenizer = load_model("smollm2-135m")
    ids = chat_input_ids(tokenizer, "Name three colours.")
    expected = _hf_greedy(model, ids, 24, eos=tokenizer.eos_token_id)
    for method in ["full", "calm"]:
        out = exits.generate(model, ids, 24, method=method, exit_conf_threshold=2.0, exit_min_layer=10,
                             eos_token_id=tokenizer.eos_token_id)
        assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_free_without_shallow_exits_reproduces_hf_generate(family):
    model, _ = tiny_model(family)
    ids = _prompt(7)
    out = exits.generate(model, ids, 16, method="free", shallow_exit_layer=2, shallow2deep_conf_threshold=1.5,
                         eos_token_id=2)
    assert torch.equal(out.sequences, _hf_greedy(model, ids, 16, eos=2))
    assert (out.exit_layers == get_adapter(model).num_layers).all()


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt", "gpt2"])
@torch.no_grad()
def test_synchronized_deep_pass_equals_one_token_at_a_time(family):
    """FREE's parallel pass over stacked states writes the same deep K/V (and outputs) as running them singly."""
    model, _ = tiny_model(family, num_hidden_layers=6)
    adapter = get_adapter(model)
    ids = _prompt(8, length=10)
    states = torch.randn(1, 4, adapter.hidden_size, generator=torch.Generator().manual_seed(9))
    positions = torch.arange(10, 14).unsqueeze(0)
    parallel, serial = adapter.new_cache(), adapter.new_cache()
    for cache in (parallel, serial):
        adapter.forward(ids, cache=cache)
    out_parallel = exits.deep_pass(adapter, states, positions, parallel, range(2, 6))
    out_serial = torch.cat([
        exits.deep_pass(adapter, states[:, k : k + 1], positions[:, k : k + 1], serial, range(2, 6)) for k in range(4)
    ], dim=1)
    torch.testing.assert_close(out_parallel, out_serial, rtol=1e-5, atol=1e-5)
    for layer in range(2, 6):
        torch.testing.assert_close(parallel.layers[layer].keys, serial.layers[layer].keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parallel.layers[layer].values, serial.layers[layer].values, rtol=1e-5, atol=1e-5)


def test_free_all_shallow_equals_static_exit_after_the_first_token():
    """Shallow layers never depend on deep ones, so FREE with every token shallow is static exit at Ls."""
    model, _ = tiny_model("llama", num_hidden_layers=6)
    ids = _prompt(10)
    free = exits.generate(model, ids, 12, method="free", shallow_exit_layer=3, shallow2deep_conf_threshold=0.0,
                          eos_token_id=[])
    assert free.exit_layers[0, 0] == 6 and (free.exit_layers[0, 1:] == 3).all()
    static = exits.generate(model, free.sequences[:, :8], 11, method="static", static_exit_layer=3, eos_token_id=[])
    assert torch.equal(static.sequences, free.sequences)


def test_free_exit_layers_follow_the_confidence():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    tau = 0.0016  # a random tiny model is unsure: its p1 - p2 at layer 3 lies around 0.0014-0.0027
    out = exits.generate(model, _prompt(11), 30, method="free", shallow_exit_layer=3,
                         shallow2deep_conf_threshold=tau, eos_token_id=[])
    shallow = [c[0] > tau for c in out.confidences[1:]]
    assert [layer == 3 for layer in out.exit_layers[0, 1:].tolist()] == shallow
    assert any(shallow) and not all(shallow)  # the case exercises both branches and at least one sync
