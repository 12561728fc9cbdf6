"""The architecture adapter reproduces each family's own forward pass, with and without a KV cache."""

import pytest
import torch

from effllm.adapters import UnsupportedArchitectureError, get_adapter
from effllm.models import TINY_FAMILIES, tiny_model

FAMILIES = sorted(TINY_FAMILIES)


def _reference_and_kwargs(family, model, adapter, ids):
    if model.config.is_encoder_decoder:
        source = torch.randint(3, 250, (ids.shape[0], 9), generator=torch.Generator().manual_seed(1))
        reference = model(input_ids=source, decoder_input_ids=ids).logits
        return reference, {"encoder_hidden_states": adapter.encode(source)}
    return model(ids).logits, {}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_layer_by_layer_forward_equals_model(family):
    model, _ = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    reference, kwargs = _reference_and_kwargs(family, model, adapter, ids)
    logits, states = adapter.forward(ids, output_hidden_states=True, **kwargs)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert len(states) == adapter.num_layers + 1
    assert adapter.vocab_size == reference.shape[-1]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_incremental_decoding_with_cache_equals_full_forward(family):
    """Prefill 8 tokens, then feed one token at a time through run_layer with the adapter's cache."""
    model, _ = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(2))
    reference, kwargs = _reference_and_kwargs(family, model, adapter, ids)
    cache = adapter.new_cache()
    pieces = [adapter.forward(ids[:, :8], cache=cache, **kwargs)[0]]
    for t in range(8, ids.shape[1]):
        pieces.append(adapter.forward(ids[:, t : t + 1], cache=cache, **kwargs)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, rtol=1e-4, atol=1e-4)
    assert adapter.cached_length(cache, adapter.num_layers - 1) == ids.shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_are_the_models_own_modules(family):
    model, _ = tiny_model(family)
    adapter = get_adapter(model)
    named = dict(model.named_modules())
    for i in range(adapter.num_layers):
        linears = adapter.linears(i)
        expected = len(adapter.attention_projections(i)) + len(adapter.mlp_projections(i))
        assert len(linears) == expected
        for name, module in linears.items():
            assert named[name] is module  # qualified names as in model.named_modules()
            weight = adapter.weight(module)
            assert weight.dim() == 2
        # [out, in] orientation: the down/o projections write back into the residual stream of width d
        assert adapter.weight(adapter.mlp_projections(i)["down"]).shape[0] == adapter.hidden_size
        assert adapter.weight(adapter.attention_projections(i)["o"]).shape[0] == adapter.hidden_size
        assert set(adapter.norms(i)) >= {"attention", "mlp"}
        assert named[adapter.layer_name(i)] is adapter.layer(i)
    assert adapter.embed_tokens.weight.shape[1] == adapter.hidden_size


def test_logit_lens_at_last_layer_is_the_model_output():
    model, _ = tiny_model("gemma3")
    adapter = get_adapter(model)
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(3))
    logits, states = adapter.forward(ids, output_hidden_states=True)
    torch.testing.assert_close(adapter.logits(states[-1]), logits)


def test_layer_index_out_of_range():
    model, _ = tiny_model("llama")
    with pytest.raises(IndexError, match="4 layers"):
        get_adapter(model).layer(4)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="supported: gemma, gemma3_text, gpt2, llama"):
        get_adapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3", "opt", "gpt2"])
@torch.no_grad()
def test_append_kv_writes_what_the_layer_would_write(family):
    """CALM's state propagation: K/V from a state, without the rest of the layer, as the layer computes them."""
    model, _ = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(4))
    full, kv_only = adapter.new_cache(), adapter.new_cache()
    for cache in (full, kv_only):
        adapter.forward(ids[:, :8], cache=cache)
    hidden = adapter.embed(ids[:, 8:], cache=full)
    contexts = [adapter.context(hidden, cache=cache) for cache in (full, kv_only)]  # position 8 for both
    for i in range(adapter.num_layers):
        adapter.run_layer(i, hidden, contexts[0])
        adapter.append_kv(i, hidden, contexts[1])
        keys = [c.layers[i].keys for c in (full, kv_only)]
        values = [c.layers[i].values for c in (full, kv_only)]
        torch.testing.assert_close(keys[0], keys[1])
        torch.testing.assert_close(values[0], values[1])


def test_every_tiny_family_maps_to_the_adapter_module_of_its_family():
    from effllm import adapters

    expected = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gemma": "llama", "gemma3": "llama",
                "opt": "opt", "gpt2": "gpt2", "t5": "t5", "t5-tied": "t5"}
    assert sorted(expected) == FAMILIES  # a new tiny family needs its row here
    for family, module in expected.items():
        model, _ = tiny_model(family)
        adapter_class = adapters.ADAPTERS[model.config.model_type]
        assert type(get_adapter(model)) is adapter_class
        assert adapter_class.__module__ == f"effllm.adapters.{module}"
        assert issubclass(adapter_class, adapters.ArchitectureAdapter)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "t5-tied"])
@torch.no_grad()
def test_head_logits_on_normed_states_are_the_logits(family):
    """head_logits is logits without what normed applies (the final norm, OPT's project_out, T5's output scaling)."""
    model, _ = tiny_model(family)
    adapter = get_adapter(model)
    hidden = torch.randn(2, 3, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([7, 3, 300])
    normed = adapter.normed(hidden)
    torch.testing.assert_close(adapter.head_logits(normed), adapter.logits(hidden))
    torch.testing.assert_close(adapter.head_logits(normed, rows), adapter.logits(hidden)[..., rows])
