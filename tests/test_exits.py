"""The decoding engine against HF `generate`, and the exit bookkeeping."""

import math

import pytest
import torch

from effllm import exits
from effllm.adapters import get_adapter
from effllm.decoding import VocabPruning
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
    """Threshold 0 exits at exit_min_layer on every token, the first included (token 0 is checked too:
    fast_robust_early_exit deploying_t5.py:926, pos_time 1); the token is that layer's argmax."""
    model, _ = tiny_model("llama", num_hidden_layers=6)
    adapter = get_adapter(model)
    ids = _prompt(3)
    out = exits.generate(model, ids, 6, method="calm", exit_conf_threshold=0.0, exit_min_layer=2, eos_token_id=[])
    assert (out.exit_layers[0] == 2).all()
    # token 0 by hand: the prompt's last position after 2 layers
    first = adapter.forward(ids, output_hidden_states=True)[1][2][:, -1:]
    assert adapter.logits(first).argmax(-1).item() == out.sequences[0, 7].item()
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
        ({"method": "beam"}, "allowed: full, static, calm, free, skip"),
        ({"method": "calm", "exit_conf_type": "entropy"}, "allowed: softmax, state, meta"),
        ({"method": "calm", "exit_conf_type": "meta"}, "needs meta_classifier"),
        ({"method": "calm", "type_vocab_reduct": "top"}, "allowed: none, fixed, decaying, adaptive"),
        ({"method": "calm", "type_vocab_reduct": "fixed", "k": 1}, r"k must be an integer in \[2, 384\]"),
        ({"method": "calm", "type_vocab_reduct": "fixed", "k": 385}, r"k must be an integer in \[2, 384\]"),
        ({"method": "calm", "type_vocab_reduct": "fixed", "exit_conf_type": "state"}, "needs exit_conf_type='softmax'"),
        ({"method": "free", "shallow_exit_layer": 4}, "shallow_exit_layer must be a layer between 1 and 3"),
        ({"method": "free", "shallow_exit_layer": 2, "shallow2deep_conf_threshold": -1}, "must be a number >= 0"),
        ({"method": "calm", "use_adapt_threshold": True}, "belong to method='free'"),
        ({"method": "free", "shallow_exit_layer": 2, "rollback_threshold": float("nan")}, "rollback_threshold"),
    ],
)
def test_bad_input(params, match):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        exits.generate(model, _prompt(5), 4, **params)


def test_calm_decodes_a_batch_each_row_as_if_alone():
    """The seeds' front end passes batches on to lock step (tests/test_lockstep.py covers every policy and family)."""
    model, _ = tiny_model("llama")
    ids = _prompt(6, batch=2)
    out = exits.generate(model, ids, 4, method="calm", exit_min_layer=1, exit_conf_threshold=0.0, eos_token_id=[])
    for row in range(2):
        alone = exits.generate(model, ids[row : row + 1], 4, method="calm", exit_min_layer=1, exit_conf_threshold=0.0,
                               eos_token_id=[])
        assert torch.equal(out.sequences[row : row + 1], alone.sequences)
        assert out.exit_layers[row].tolist() == alone.exit_layers[0].tolist()


@pytest.mark.embedded
def test_embedded_model_full_and_disabled_calm_match_hf():
    from effllm.models import chat_input_ids, load_model

    model, tokenizer = load_model("smollm2-135m")
    ids = chat_input_ids(tokenizer, "Name three colours.")
    expected = _hf_greedy(model, ids, 24, eos=tokenizer.eos_token_id)
    disabled = {"full": {}, "static": {"static_exit_layer": 30},
                "calm": {"exit_conf_threshold": 2.0, "exit_min_layer": 10},
                "free": {"shallow_exit_layer": 20, "shallow2deep_conf_threshold": 2.0}}
    for method, params in disabled.items():
        out = exits.generate(model, ids, 24, method=method, eos_token_id=tokenizer.eos_token_id, **params)
        assert torch.equal(out.sequences, expected), method
        assert (out.exit_layers == 30).all()


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

    def deep_pass(hidden, position_ids, cache):  # layers 2..5 on `hidden` in one causal pass, as FREE's sync does
        context = adapter.context(hidden, position_ids=position_ids, cache=cache)
        for i in range(2, 6):
            hidden = adapter.run_layer(i, hidden, context)
        return hidden

    out_parallel = deep_pass(states, positions, parallel)
    out_serial = torch.cat([deep_pass(states[:, k : k + 1], positions[:, k : k + 1], serial) for k in range(4)],
                           dim=1)
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


# ---- the pending (recompute-later) path, FREE, rollback, adaptive threshold, meta, vocabulary pruning, T5 ----


def _full_forward_states(model, sequence):
    """Hidden states [layer][position] of the full model on ``sequence`` (embeddings first)."""
    _, states = get_adapter(model).forward(sequence, output_hidden_states=True)
    return states


def _check_tokens_come_from_their_exit_layers(model, out, prompt_len):
    """Without state copying, every position eventually gets the full model's states, so a token that left
    from layer e is the argmax at layer e of a plain full forward over the generated sequence."""
    adapter = get_adapter(model)
    states = _full_forward_states(model, out.sequences[:, :-1])
    for t, layer in enumerate(out.exit_layers[0].tolist()):
        position = prompt_len - 1 + t
        expected = adapter.logits(states[layer][:, position : position + 1]).argmax(-1).item()
        assert out.sequences[0, prompt_len + t].item() == expected, (t, layer)


def _median_confidence(model, ids, **params):
    """A threshold that the model's confidences cross about half the time: a mix of exits and deep tokens."""
    never = "exit_conf_threshold" if params["method"] == "calm" else "shallow2deep_conf_threshold"
    out = exits.generate(model, ids, 24, eos_token_id=[], **{never: 2.0}, **params)
    return float(torch.tensor([c for cs in out.confidences for c in cs]).median())


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_calm_recomputing_skipped_layers_later_matches_the_full_model_states(family):
    model, _ = tiny_model(family, num_hidden_layers=6)
    ids = _prompt(12)
    tau = _median_confidence(model, ids, method="calm", exit_min_layer=2)
    out = exits.generate(model, ids, 24, method="calm", exit_conf_threshold=tau, exit_min_layer=2,
                         state_propagation=False, eos_token_id=[])
    layers = set(out.exit_layers[0, 1:].tolist())
    assert len(layers) > 1 and min(layers) < 6  # the case mixes exits and full-depth tokens
    _check_tokens_come_from_their_exit_layers(model, out, ids.shape[1])


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_free_tokens_come_from_the_shallow_or_the_deep_model(family):
    model, _ = tiny_model(family, num_hidden_layers=6)
    ids = _prompt(13)
    tau = _median_confidence(model, ids, method="free", shallow_exit_layer=3)
    out = exits.generate(model, ids, 30, method="free", shallow_exit_layer=3, shallow2deep_conf_threshold=tau,
                         eos_token_id=[])
    assert {3, 6} <= set(out.exit_layers[0, 1:].tolist())
    _check_tokens_come_from_their_exit_layers(model, out, ids.shape[1])


def _count_layer_calls(model):
    calls = []
    for layer in get_adapter(model).layers:
        layer.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    return calls


def test_exit_layers_are_the_layers_actually_run():
    """CALM with propagation runs exactly exit_layers[t] layers for token t (the rest only get K/V);
    FREE runs Ls layers per token plus, once per deep token, the deep layers over every stacked token."""
    model, _ = tiny_model("llama", num_hidden_layers=6)
    calls = _count_layer_calls(model)
    out = exits.generate(model, _prompt(14), 24, method="calm", exit_conf_threshold=0.002, exit_min_layer=2,
                         eos_token_id=[])
    assert len(calls) == 6 + int(out.exit_layers[0, 1:].sum())
    calls.clear()
    out = exits.generate(model, _prompt(14), 30, method="free", shallow_exit_layer=3,
                         shallow2deep_conf_threshold=0.0016, eos_token_id=[])
    new = out.exit_layers[0, 1:].tolist()
    assert len(calls) == 6 + 3 * len(new) + 3 * new.count(6)
    # the deep passes process every token exactly once per deep layer (in joint passes)
    assert sum(calls) == 6 * 7 + 3 * len(new) + 3 * len(new[: max(i for i, e in enumerate(new) if e == 6) + 1])


def test_rollback_revises_shallow_tokens_the_deep_model_rejects():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    ids = _prompt(15)
    tau = _median_confidence(model, ids, method="free", shallow_exit_layer=3)
    params = {"method": "free", "shallow_exit_layer": 3, "shallow2deep_conf_threshold": tau, "eos_token_id": []}
    plain = exits.generate(model, ids, 30, **params)
    # threshold 0 nats: any stacked token with a deep probability below 1 is revised
    revised = exits.generate(model, ids, 30, rollback_threshold=0.0, **params)
    assert plain.rollbacks == 0 and revised.rollbacks > 0
    assert revised.sequences.shape == plain.sequences.shape
    _check_tokens_come_from_their_exit_layers(model, revised, ids.shape[1])
    # a rollback threshold nothing reaches changes nothing
    never = exits.generate(model, ids, 30, rollback_threshold=1e9, **params)
    assert torch.equal(never.sequences, plain.sequences) and never.rollbacks == 0


def test_adaptive_threshold_learns_across_generations():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    state = exits.AdaptiveThreshold(initial=0.0016)
    for seed in range(3):
        out = exits.generate(model, _prompt(20 + seed), 20, method="free", shallow_exit_layer=3,
                             shallow2deep_conf_threshold=0.0016, use_adapt_threshold=True, adapt_threshold=state,
                             eos_token_id=[])
        assert out.thresholds[1:] and all(0 <= t <= 0.9 for t in out.thresholds[1:])
        assert len(set(out.thresholds[1:])) == 1  # fitted at the start of a sequence only, never inside one
    assert state.sequences == 3 and len(state.samples) > 0 and state.fits >= 1


def test_meta_confidence_uses_the_classifier():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    seen = []

    def classifier(layer, hidden):
        seen.append(layer)
        return torch.tensor(1.0 if layer == 4 else 0.0)

    out = exits.generate(model, _prompt(16), 6, method="calm", exit_conf_type="meta", meta_classifier=classifier,
                         exit_conf_threshold=0.5, exit_min_layer=2, eos_token_id=[])
    assert (out.exit_layers[0, 1:] == 4).all()
    assert seen[:3] == [2, 3, 4]


@pytest.mark.parametrize("reduct", ["fixed", "decaying", "adaptive"])
def test_vocabulary_pruning_with_the_whole_vocabulary_changes_nothing(reduct):
    model, _ = tiny_model("llama", num_hidden_layers=6)
    ids = _prompt(17)
    plain = exits.generate(model, ids, 20, method="calm", exit_conf_threshold=0.002, exit_min_layer=2,
                           eos_token_id=[])
    # k = V and k_min = V keep every row at every layer
    pruned = exits.generate(model, ids, 20, method="calm", exit_conf_threshold=0.002, exit_min_layer=2,
                            eos_token_id=[], type_vocab_reduct=reduct, k=384, k_min=384)
    assert torch.equal(pruned.sequences, plain.sequences)
    assert torch.equal(pruned.exit_layers, plain.exit_layers)
    for a, b in zip(plain.confidences, pruned.confidences, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_pruned_exit_emits_the_full_vocabulary_id():
    """A head whose rows are one-hot: the exit's argmax in the pruned space maps back to the right id."""
    model, _ = tiny_model("llama", num_hidden_layers=4)
    adapter = get_adapter(model)
    head = exits.ExitHead(adapter, vocab=VocabPruning("fixed", k=3), candidate_layer=1)
    hidden = torch.zeros(1, 1, adapter.hidden_size)
    with torch.no_grad():
        weight = torch.zeros(adapter.vocab_size, adapter.hidden_size)
        weight[300, 0], weight[17, 1], weight[250, 2] = 5.0, 4.0, 3.0
        adapter.lm_head.weight.copy_(weight)
        adapter.final_norm.weight.fill_(1.0)
        hidden[0, 0, :3] = torch.tensor([1.0, 1.0, 1.0])
        conf, token = head.confidence(1, hidden, hidden)  # full vocabulary: picks the candidates
        assert token.item() == 300 and head.rows.tolist() == [300, 17, 250]
        hidden[0, 0, :3] = torch.tensor([0.0, 0.0, 9.0])  # now id 250 is the best of the three
        conf, token = head.confidence(2, hidden, hidden)
        assert token.item() == 250
        assert head.flops == (2 * adapter.hidden_size - 1) * (adapter.vocab_size + 3)


def test_decaying_and_adaptive_k_follow_the_formulas():
    k, k_min, n = 256, 16, 30
    for layer in range(1, n + 1):
        assert exits.decaying_k(k, k_min, layer, n) == max(k_min, math.floor(k / (1 + (k - k_min) / k_min * layer / n)))
    assert exits.decaying_k(k, k_min, n, n) == 16  # k / (1 + (k - k_min)/k_min) = k_min at l = L
    assert exits.adaptive_k(1000, 0.5, 8) == 550 and exits.adaptive_k(1000, 1.0, 200) == 200


@pytest.mark.parametrize("method", ["full", "calm", "free"])
def test_t5_decoder_reproduces_hf_generate(method):
    # encoder and decoder of equal depth: HF's own generate sizes its cache by the encoder's layer count
    model, _ = tiny_model("t5", num_layers=4)
    src = _prompt(18, length=9)
    expected = model.generate(src, attention_mask=torch.ones_like(src), max_new_tokens=12, do_sample=False,
                              eos_token_id=2, pad_token_id=0)
    params = {"calm": {"exit_conf_threshold": 1.5, "exit_min_layer": 1},
              "free": {"shallow_exit_layer": 1, "shallow2deep_conf_threshold": 1.5}}.get(method, {})
    out = exits.generate(model, src, 12, method=method, eos_token_id=2, **params)
    assert torch.equal(out.sequences, expected)


def test_t5_calm_state_propagation_runs_and_exits():
    model, _ = tiny_model("t5")
    out = exits.generate(model, _prompt(19, length=9), 10, method="calm", exit_conf_threshold=0.0,
                         exit_min_layer=1, eos_token_id=[])
    assert (out.exit_layers[0, 1:] == 1).all() and out.sequences.shape == (1, 11)


def test_the_front_end_maps_the_seeds_names_onto_the_policies():
    """One name per concept in the policies; the seeds' names live only in generate / make_policy."""
    from effllm.decoding import Calm, Free, Skip

    assert exits.make_policy("calm", exit_conf_threshold=0.7, exit_min_layer=3, state_propagation=False) == Calm(
        threshold=0.7, candidate_layer=3, kv="deferred")
    assert exits.make_policy("free", shallow_exit_layer=4, shallow2deep_conf_threshold=0.6) == Free(4, threshold=0.6)
    assert exits.make_policy("free", shallow_exit_layer=4, type_vocab_reduct="fixed", k=8, exit_min_layer=2) == Free(
        4, vocab=VocabPruning("fixed", 8), candidate_layer=2)
    assert exits.make_policy("skip", skip_mode="random", budget=0.5, skipped_kv="none") == Skip(
        "random", budget=0.5, kv="none")
    assert exits.in_seed_names("candidate_layer must be a layer; threshold; rollback_threshold", "calm") == (
        "exit_min_layer must be a layer; exit_conf_threshold; rollback_threshold")
    with pytest.raises(ValueError, match="state_propagation must be True or False"):
        exits.make_policy("calm", state_propagation="no")
