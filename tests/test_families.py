"""Every model family through its adapter: full-depth decoding equals HF `generate` token for token (T5 with
and without tied embeddings, with a padded encoder batch), with no deprecated transformers API on the way,
on the transformers versions pyproject.toml allows."""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch

from effllm import exits
from effllm.adapters import get_adapter
from effllm.models import TINY_FAMILIES, tiny_model

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

FAMILIES = sorted(TINY_FAMILIES)
SEQ2SEQ = [f for f in FAMILIES if TINY_FAMILIES[f][0] == "t5"]


def _model(family: str):
    # encoder and decoder of equal depth for T5: HF's own generate sizes its cache by the encoder's layer count
    return tiny_model(family, num_layers=4) if family in SEQ2SEQ else tiny_model(family)


def _hf_greedy(model, ids, max_new_tokens, attention_mask=None):
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


def _padded_source(batch: int = 3, length: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A T5 source batch whose rows have 9, 6 and 3 real tokens (pad id 0 after them)."""
    ids = torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, length - 3 * row :] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", FAMILIES)
def test_full_depth_decoding_equals_hf_generate(family):
    model, _ = _model(family)
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = _hf_greedy(model, ids, 12)
    out = exits.generate(model, ids, 12, method="full", eos_token_id=[])
    assert torch.equal(out.sequences, expected)
    assert (out.exit_layers == get_adapter(model).num_layers).all()


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_t5_padded_encoder_batch_equals_hf_generate(family):
    model, _ = _model(family)
    source, mask = _padded_source()
    expected = _hf_greedy(model, source, 10, attention_mask=mask)
    out = exits.generate(model, source, 10, method="full", eos_token_id=[], attention_mask=mask)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("family", SEQ2SEQ)
@torch.no_grad()
def test_t5_encoder_mask_reaches_cross_attention_as_t5_builds_it(family):
    """Teacher-forced logits of a padded batch through the adapter equal the model's own (random T5s repeat
    one token when decoding greedily, so the logits are the sharper check), and the padding matters."""
    model, _ = _model(family)
    adapter = get_adapter(model)
    source, mask = _padded_source()
    target = torch.randint(3, 250, (3, 6), generator=torch.Generator().manual_seed(2))
    reference = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
    encoded = adapter.encode(source, attention_mask=mask)
    logits, _ = adapter.forward(target, encoder_hidden_states=encoded, encoder_attention_mask=mask)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    unmasked, _ = adapter.forward(target, encoder_hidden_states=encoded)
    torch.testing.assert_close(unmasked[0], logits[0], rtol=1e-5, atol=1e-5)  # row 0 has no padding
    assert not torch.allclose(unmasked[1:], logits[1:], atol=1e-3)


def test_tied_t5_scales_its_output_like_t5_large():
    model, _ = tiny_model("t5-tied")
    adapter = get_adapter(model)
    assert model.config.scale_decoder_outputs and adapter.tied_embeddings
    assert set(adapter.mlp_projections(0)) == {"up", "down"}  # original T5's ReLU MLP (wi, wo)
    untied, _ = tiny_model("t5")
    assert not untied.config.scale_decoder_outputs and set(get_adapter(untied).mlp_projections(0)) == {
        "gate", "up", "down"}


def test_gemma_v1_keeps_its_wide_heads():
    model, _ = tiny_model("gemma")
    adapter = get_adapter(model)
    projections = adapter.attention_projections(0)
    assert adapter.weight(projections["q"]).shape == (96, 64)  # 4 heads x head_dim 24 > d = 64, as in the 7B
    assert adapter.weight(projections["o"]).shape == (64, 96)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_uses_no_deprecated_transformers_api(family):
    """transformers 5.24 deprecates `past_key_values=` on layers and mask builders (removed in 5.40) with a
    FutureWarning; the adapters use `cache=`. A FutureWarning or DeprecationWarning here is an error."""
    model, _ = _model(family)
    source, mask = _padded_source(batch=2)
    kwargs = {"attention_mask": mask} if family in SEQ2SEQ else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for method, params in [("full", {}), ("calm", {"exit_conf_threshold": 0.0, "exit_min_layer": 1})]:
            ids = source if method == "full" else source[:1]  # CALM decodes one sequence at a time
            extra = kwargs if method == "full" else {k: v[:1] for k, v in kwargs.items()}
            exits.generate(model, ids, 4, method=method, eos_token_id=[], **params, **extra)
        adapter = get_adapter(model)
        cache = adapter.new_cache()
        context = {"encoder_hidden_states": adapter.encode(source[:1])} if family in SEQ2SEQ else {}
        adapter.forward(source[:1, :4], cache=cache, **context)
        hidden = adapter.embed(source[:1, 4:5], cache=cache)
        step = adapter.context(hidden, cache=cache, **context)
        for i in range(adapter.num_layers):
            adapter.append_kv(i, hidden, step)  # CALM's K/V-only propagation


def test_installed_transformers_is_within_the_tested_bounds():
    """pyproject.toml allows the transformers releases the tests ran on; the lower bound is the first release
    whose decoder layers take `cache=` (an older one would drop it into **kwargs and decode without a cache)."""
    from packaging.specifiers import SpecifierSet
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.t5.modeling_t5 import T5Block

    requirements = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (bound,) = [re.sub(r"^transformers", "", r) for r in requirements if re.match(r"transformers\W", r)]
    installed = metadata.version("transformers")
    assert SpecifierSet(bound).contains(installed), f"transformers {installed} is outside pyproject's {bound}"
    assert SpecifierSet(bound).contains("5.24.0") and not SpecifierSet(bound).contains("5.23.0")
    for layer in (LlamaDecoderLayer, T5Block):
        assert "cache" in inspect.signature(layer.forward).parameters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the model on the GPU, ids on the CPU")
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_t5_on_a_gpu_takes_ids_and_masks_from_the_cpu(family):
    model, _ = _model(family)
    model = model.to("cuda")
    source, mask = _padded_source()
    expected = _hf_greedy(model, source.cuda(), 8, attention_mask=mask.cuda()).cpu()
    out = exits.generate(model, source, 8, method="full", eos_token_id=[], attention_mask=mask)
    assert torch.equal(out.sequences.cpu(), expected)
