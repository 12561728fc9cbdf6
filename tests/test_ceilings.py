"""Speed ceilings from weight reads (effllm.decoding.ceilings) against counts made another way."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effllm.decoding import Calm, Free, Full, SelfSpec, Skip, StaticExit
from effllm.decoding.ceilings import WeightReads, ceiling, ceilings
from effllm.models import tiny_model


@pytest.fixture(scope="module")
def smollm2_shape():
    """SmolLM2-135M's architecture (its config.json's sizes) on the meta device: parameters counted, none stored."""
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_full_depth_reads_every_parameter_once(smollm2_shape):
    """A tied head is the embedding matrix: a full-depth token reads every parameter of the model once."""
    reads = WeightReads.of(smollm2_shape)
    assert reads.full == sum(p.numel() for p in smollm2_shape.parameters())
    assert reads.head == 49152 * 576 + 576


def test_smollm2_ceilings_match_the_hand_count(smollm2_shape):
    """The hand count of the early-exit issue: (3.54 E + 28.3)M weights for an exit at E of 30, 134.5M at full depth
    (its 1.36x / 1.66x / 2.1x at E = 20 / 15 / 10, to within its rounding)."""
    reads = WeightReads.of(smollm2_shape)
    for layer, expected in ((20, 1.36), (15, 1.66), (10, 2.10)):
        assert reads.exit_ceiling(layer) == pytest.approx(134.5 / (3.54 * layer + 28.3), rel=2e-3)
        assert reads.exit_ceiling(layer) == pytest.approx(expected, abs=0.015)
    assert reads.exit_ceiling(30) == 1.0


def test_untied_head_counts_the_head_not_the_embedding():
    """Untied, the embedding matrix is only looked up (one row a token): every parameter but it is read."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    reads = WeightReads.of(model)
    embed = model.get_input_embeddings().weight.numel()
    assert reads.full == sum(p.numel() for p in model.parameters()) - embed
    assert reads.kv == (2 * 64 * 32,) * 3  # K and V: 2 key-value heads of 16 each, from a width of 64


def test_policy_ceilings_order_and_bounds():
    model, _ = tiny_model("llama")
    reads = WeightReads.of(model)
    n = reads.n_layers
    assert ceiling(reads, None) == ceiling(reads, Full()) == 1.0
    assert ceiling(reads, StaticExit(n)) == 1.0
    assert ceiling(reads, Free(shallow_exit_layer=1)) == ceiling(reads, StaticExit(1)) > 1
    deferred = ceiling(reads, Calm(candidate_layer=1, kv="deferred"))
    propagated = ceiling(reads, Calm(candidate_layer=1, kv="propagate"))
    assert deferred == ceiling(reads, StaticExit(1)) > propagated > 1
    # self-speculation at full acceptance, computed round by round: g + 1 tokens per round
    e, g = 1, 4
    round_reads = (g + 1) * sum(reads.layers[:e]) + g * reads.head + sum(reads.layers[e:]) + reads.head
    assert ceiling(reads, SelfSpec(draft_exit_layer=e, num_draft_tokens=g)) == pytest.approx(
        (g + 1) * reads.full / round_reads)
    assert ceiling(reads, SelfSpec(draft_exit_layer=e, num_draft_tokens=g)) < ceiling(reads, StaticExit(e))
    every = Skip(skip_mode="static", skip_pattern=list(range(n)))
    assert ceiling(reads, every) == pytest.approx(1.0)
    assert math.isnan(ceiling(reads, Skip(skip_mode="controller", controller="x.pt")))


def test_trained_exit_modules_are_read_too():
    model, _ = tiny_model("llama")
    from effllm.training.modules import build_exit_modules

    exits = build_exit_modules(model, "mlp", [1])
    plain = WeightReads.of(model)
    trained = WeightReads.of(model, exits)
    assert trained.exits[1] == sum(p.numel() for p in exits.parameters()) > 0
    assert trained.exit_ceiling(1) < plain.exit_ceiling(1)
    assert ceilings(model, {"static@1": StaticExit(1)}, exits)["static@1"] == trained.exit_ceiling(1)


def test_out_of_range_layer_is_refused():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="1-based"):
        WeightReads.of(model).exit_at(0)


def test_self_spec_bound_at_full_acceptance_is_the_ceiling():
    model, _ = tiny_model("llama")
    reads = WeightReads.of(model)
    from effllm.decoding.ceilings import self_spec_bound

    assert self_spec_bound(reads, 1.0, 4, 1) == pytest.approx(ceiling(reads, SelfSpec(draft_exit_layer=1,
                                                                                       num_draft_tokens=4)))
    assert self_spec_bound(reads, 0.0, 4, 1) < 1  # nothing accepted: the drafts are pure cost
    with pytest.raises(ValueError, match="rate"):
        self_spec_bound(reads, 1.5, 4, 1)
