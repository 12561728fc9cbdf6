"""effllm.vocab against brute-force references: sorting for ranks, counting for survival, HF forward passes
and the decoding engine's own pruned exit head (effllm.decoding.exits.ExitHead) for the per-layer analysis."""

from __future__ import annotations

import pytest
import torch

from effllm import exits, vocab
from effllm.adapters import get_adapter
from effllm.decoding.exits import ExitHead
from effllm.decoding.policies import VocabPruning
from effllm.lens import LinearExits
from effllm.models import tiny_model


def test_final_token_ranks_match_sorting():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 97, generator=generator)  # continuous: no ties
    final = torch.randint(0, 97, (3, 5), generator=generator)
    ranks = vocab.final_token_ranks(logits, final)
    order = logits.argsort(dim=-1, descending=True)
    expected = (order == final.unsqueeze(-1)).float().argmax(-1)
    assert torch.equal(ranks, expected)
    assert torch.equal(vocab.final_token_ranks(logits, logits.argmax(-1)), torch.zeros(3, 5, dtype=torch.long))


def test_final_token_ranks_count_ties_in_favour_and_check_shapes():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert vocab.final_token_ranks(logits, torch.tensor([2])).tolist() == [0]
    assert vocab.final_token_ranks(logits, torch.tensor([3])).tolist() == [3]
    with pytest.raises(ValueError, match="shape"):
        vocab.final_token_ranks(logits, torch.tensor([[1]]))


def test_survival_rate_counts_ranks_below_k():
    ranks = [0, 0, 3, 10, 255, 256, 1000]
    table = vocab.survival_rate(ranks, ks=[1, 4, 256, 2000])
    assert table.survival.tolist() == pytest.approx([2 / 7, 3 / 7, 5 / 7, 1.0])
    assert (table.tokens == 7).all()
    with pytest.raises(ValueError, match="integer >= 1"):
        vocab.survival_rate(ranks, ks=[0])
    with pytest.raises(ValueError, match="at least one"):
        vocab.survival_rate([], ks=[1])


def _random_exits(n_layers: int, d: int) -> LinearExits:
    generator = torch.Generator().manual_seed(1)
    weight = torch.eye(d).repeat(n_layers - 1, 1, 1) + 0.3 * torch.randn(n_layers - 1, d, d, generator=generator)
    return LinearExits(weight, 0.1 * torch.randn(n_layers - 1, d, generator=generator))


@pytest.mark.parametrize("with_exits", [False, True])
def test_layer_analysis_equals_hf_states_and_the_engines_pruned_head(with_exits):
    model, _ = tiny_model("llama", num_hidden_layers=5)
    adapter = get_adapter(model)
    n_layers, prune_layer, k = 5, 2, 16
    transform = _random_exits(n_layers, adapter.hidden_size) if with_exits else None
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(2))
    table = vocab.layer_analysis(model, ids, prune_layer=prune_layer, k=k, exit_transform=transform,
                                 batch_size=1, chunk_tokens=5, progress=False)
    assert len(table) == 2 * 9 * n_layers
    with torch.no_grad():
        hf = model(ids, output_hidden_states=True)
    final = hf.logits.argmax(-1)  # [2, 9]
    with torch.no_grad():  # the engine's head and HF's modules, without autograd
        for s in range(2):
            for p in range(9):
                rows = table[(table.sequence == s) & (table.position == p)].set_index("layer")
                head = ExitHead(adapter, transform, "softmax", vocab=VocabPruning("fixed", k=k), candidate_layer=prune_layer)
                head.new_token()
                for layer in range(1, n_layers):
                    h = hf.hidden_states[layer][s : s + 1, p : p + 1]
                    state = transform(layer, h) if transform is not None else h
                    full_logits = model.lm_head(model.model.norm(state))[0, 0]
                    assert rows.loc[layer, "confidence"] == pytest.approx(float(exits.softmax_confidence(full_logits)),
                                                                          abs=1e-5)
                    expected_rank = int((full_logits > full_logits[final[s, p]]).sum())
                    assert rows.loc[layer, "final_rank"] == expected_rank
                    assert bool(rows.loc[layer, "agrees"]) == (int(full_logits.argmax()) == int(final[s, p]))
                    if layer < prune_layer:
                        assert rows.loc[layer, ["confidence_pruned", "final_in_candidates"]].isna().all()
                        continue
                    confidence, token = head.confidence(layer, h, None)  # the engine's fixed-k pruned check
                    assert rows.loc[layer, "confidence_pruned"] == pytest.approx(confidence, abs=1e-5)
                    assert bool(rows.loc[layer, "agrees_pruned"]) == (int(token) == int(final[s, p]))
                top = model.lm_head(model.model.norm(
                    transform(prune_layer, hf.hidden_states[prune_layer][s, p]) if transform is not None
                    else hf.hidden_states[prune_layer][s, p])).topk(k).indices
                assert bool(rows.loc[prune_layer, "final_in_candidates"]) == bool((top == final[s, p]).any())
    last = table[table.layer == n_layers]
    assert last.agrees.all() and (last.final_rank == 0).all()


def test_layer_analysis_with_the_whole_vocabulary_is_unpruned():
    model, _ = tiny_model("gemma3")
    vocab_size = get_adapter(model).vocab_size
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(3))
    table = vocab.layer_analysis(model, ids, prune_layer=2, k=vocab_size, progress=False)
    pruned = table[table.layer >= 2]
    assert pruned.final_in_candidates.all()
    assert (pruned.confidence_pruned - pruned.confidence).abs().max() < 1e-5
    assert (pruned.agrees_pruned == pruned.agrees).all()
    small = vocab.layer_analysis(model, ids, prune_layer=2, k=2, layers=[2, 4], progress=False)
    assert set(small.layer) == {2, 4}
    # with two candidates, the final token survives exactly when its rank at the pruning layer is 0 or 1
    at_prune = small[small.layer == 2]
    assert (at_prune.final_in_candidates == (at_prune.final_rank < 2)).all()
    assert 0 < at_prune.final_in_candidates.mean() < 1  # both outcomes occur on this random model


def test_layer_analysis_on_the_t5_decoder_matches_hf():
    model, _ = tiny_model("t5")
    n_layers = get_adapter(model).num_layers
    source = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(4))
    target = torch.randint(3, 250, (2, 5), generator=torch.Generator().manual_seed(5))
    table = vocab.layer_analysis(model, target, prune_layer=1, k=8, encoder_input_ids=source, progress=False)
    with torch.no_grad():
        logits = model(input_ids=source, decoder_input_ids=target).logits  # [2, 5, V]
    last = table[table.layer == n_layers].sort_values(["sequence", "position"])
    assert last.agrees.all()
    expected = exits.softmax_confidence(logits).reshape(-1).numpy()
    assert abs(last.confidence.to_numpy() - expected).max() < 1e-5


def test_layer_analysis_rejects_bad_input_naming_what_is_allowed():
    model, _ = tiny_model("llama")
    ids = torch.randint(3, 250, (1, 4))
    with pytest.raises(ValueError, match="prune_layer must be a layer between 1 and 4"):
        vocab.layer_analysis(model, ids, prune_layer=0, progress=False)
    with pytest.raises(ValueError, match="layers must lie between 1 and 4"):
        vocab.layer_analysis(model, ids, prune_layer=1, layers=[2, 9], progress=False)
    with pytest.raises(ValueError, match=r"k must be an integer in \[2, 384\]"):
        vocab.layer_analysis(model, ids, prune_layer=1, k=1000, progress=False)
    with pytest.raises(ValueError, match="token_ids must be"):
        vocab.layer_analysis(model, ids[0], prune_layer=1, progress=False)


def test_confidence_check_cost_bookkeeping():
    model, _ = tiny_model("llama")
    adapter = get_adapter(model)
    table = vocab.confidence_check_cost(model, ks=[16, None, 64], min_run_time=0.01)
    assert table.k.tolist() == [16, 64, adapter.vocab_size]
    assert table.flops.tolist() == [(2 * adapter.hidden_size - 1) * k for k in table.k]
    full = table[table.k == adapter.vocab_size].iloc[0]
    assert full.speedup == 1.0 and full.flops_ratio == 1.0
    assert table.flops_ratio.tolist() == pytest.approx([adapter.vocab_size / k for k in table.k])
    assert (table.ms > 0).all()
    with pytest.raises(ValueError, match=r"every k must be an integer in \[2, 384\] \(or None for the full vocabulary\); got 1"):
        vocab.confidence_check_cost(model, ks=[1])
