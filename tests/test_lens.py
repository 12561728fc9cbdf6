"""Logit lens and fitted linear exits against straightforward references."""

import pytest
import torch

from effllm.adapters import get_adapter
from effllm.lens import LinearExits, fit_linear_exits, logit_lens_agreement
from effllm.models import tiny_model


def _ids(seed, n=6, seq=16):
    return torch.randint(3, 250, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_agreement_matches_a_direct_count():
    model, _ = tiny_model("llama")
    adapter = get_adapter(model)
    ids = _ids(0)
    table = logit_lens_agreement(model, ids, batch_size=4, progress=False)
    logits, states = adapter.forward(ids, output_hidden_states=True)
    final = logits.argmax(-1)
    for layer in range(1, adapter.num_layers + 1):
        expected = (adapter.logits(states[layer]).argmax(-1) == final).double().mean().item()
        assert table.agreement[layer - 1] == pytest.approx(expected)
    assert table.agreement.iloc[-1] == 1.0


def test_linear_exits_solve_least_squares():
    model, _ = tiny_model("opt")
    adapter = get_adapter(model)
    ids = _ids(1, n=8, seq=32)  # 256 tokens > 65 unknowns per output column
    exits = fit_linear_exits(model, ids, batch_size=3, ridge=0.0, progress=False)
    _, states = adapter.forward(ids, output_hidden_states=True)
    d = adapter.hidden_size
    target = states[-1].reshape(-1, d).double()
    for layer in (1, 2):
        x = states[layer].reshape(-1, d).double()
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        reference = torch.linalg.lstsq(x1, target).solution
        torch.testing.assert_close(exits.weight[layer - 1].double(), reference[:d], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(exits.bias[layer - 1].double(), reference[d], rtol=1e-3, atol=1e-3)
        fitted = exits(layer, states[layer]).reshape(-1, d).double()
        assert (fitted - target).pow(2).mean() < (x - target).pow(2).mean()
    assert torch.equal(exits(adapter.num_layers, states[-1]), states[-1])


def test_linear_exits_save_load_and_shape_check(tmp_path):
    model, _ = tiny_model("llama")
    exits = fit_linear_exits(model, _ids(2), progress=False, meta={"model": "tiny-llama"})
    exits.save(tmp_path)
    loaded = LinearExits.load(tmp_path, model=model)
    assert torch.equal(loaded.weight, exits.weight) and loaded.meta["model"] == "tiny-llama"
    other, _ = tiny_model("llama", num_hidden_layers=6)
    with pytest.raises(ValueError, match="fitted for 4 layers"):
        LinearExits.load(tmp_path, model=other)


def test_corrupt_cached_exits_are_refitted(tmp_path, monkeypatch):
    from effllm.lens import cached_linear_exits

    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    model, tokenizer = tiny_model("llama")
    first = cached_linear_exits(model, tokenizer, "tiny-llama", n_per_corpus=2, seq_len=32)
    (weights,) = tmp_path.glob("exits/tiny-llama/*/linear_exits.safetensors")
    weights.write_bytes(b"not a safetensors file")
    again = cached_linear_exits(model, tokenizer, "tiny-llama", n_per_corpus=2, seq_len=32)
    torch.testing.assert_close(again.weight, first.weight)
    assert LinearExits.load(weights.parent, model=model).weight.shape == first.weight.shape


def test_exits_cached_by_an_older_effllm_are_refitted_not_crashed_on(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from effllm.lens import cached_linear_exits

    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    model, tokenizer = tiny_model("llama")
    fresh = cached_linear_exits(model, tokenizer, "tiny-llama", n_per_corpus=2, seq_len=32)
    (weights,) = tmp_path.glob("exits/tiny-llama/*/linear_exits.safetensors")
    # the old format: the tensors with a metadata JSON beside them, no checksummed sidecar
    weights.with_name("linear_exits.safetensors.json").unlink()
    save_file({"weight": torch.zeros_like(fresh.weight), "bias": torch.zeros_like(fresh.bias)}, weights)
    weights.with_name("linear_exits.json").write_text('{"model": "tiny-llama"}')
    again = cached_linear_exits(model, tokenizer, "tiny-llama", n_per_corpus=2, seq_len=32)
    torch.testing.assert_close(again.weight, fresh.weight)  # refitted, not the old zeros
    assert not weights.with_name("linear_exits.json").exists()


def test_meta_classifier_learns_something_and_drives_calm():
    """Trained on the tiny model's own agreement labels, either head tells the classes apart better than chance
    (balanced accuracy; a constant predictor scores 0.5), and the MLP is the authors' shape."""
    from effllm import exits
    from effllm.lens import fit_meta_classifier

    model, _ = tiny_model("llama", num_hidden_layers=6)
    ids = torch.randint(3, 250, (8, 32), generator=torch.Generator().manual_seed(3))
    logistic = fit_meta_classifier(model, ids, min_layer=1, steps=200, progress=False, head="logistic")
    classifier = fit_meta_classifier(model, ids, min_layer=1, steps=200, progress=False)
    assert [type(m).__name__ for m in classifier.net] == ["Linear", "ReLU", "Linear"]
    assert classifier.net[0].weight.shape == (64, 64) and classifier.net[2].weight.shape == (2, 64)
    p = classifier.positive_rate
    assert 0 < p < 1 and classifier.balanced_accuracy > 0.6 and logistic.balanced_accuracy > 0.6
    out = exits.generate(model, ids[:1, :6], 6, method="calm", exit_conf_type="meta",
                         meta_classifier=classifier.bind(model), exit_conf_threshold=0.0, exit_min_layer=2,
                         eos_token_id=[])
    assert (out.exit_layers[0, 1:] == 2).all()
    prob = classifier.bind(model)(3, torch.randn(1, 1, 64))
    assert 0.0 <= float(prob) <= 1.0


def test_float32_exits_map_bfloat16_states_in_float32_and_return_bfloat16():
    torch.manual_seed(0)
    exits = LinearExits(torch.randn(3, 8, 8), torch.randn(3, 8))
    hidden = torch.randn(1, 2, 8)
    out = exits(2, hidden.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    expected = (hidden.to(torch.bfloat16).float() @ exits.weight[1] + exits.bias[1]).to(torch.bfloat16)
    assert torch.equal(out, expected)
    assert torch.equal(exits(4, hidden.to(torch.bfloat16)), hidden.to(torch.bfloat16))  # the last layer passes


def test_meta_classifier_of_a_bfloat16_model_scores_in_float32_and_leaves_its_exits_alone():
    """Notebook 01 in bfloat16 stopped here ("mat1 and mat2 must have the same dtype"): the classifier is trained in
    float32, the model's states are bfloat16, and the fitted exits it reads must keep the model's precision."""
    from effllm import exits
    from effllm.lens import fit_meta_classifier

    model, _ = tiny_model("llama", num_hidden_layers=4)
    model = model.to(torch.bfloat16)
    ids = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(5))
    fitted = fit_linear_exits(model, ids, progress=False)
    assert fitted.weight.dtype == torch.bfloat16
    classifier = fit_meta_classifier(model, ids, exit_transform=fitted, min_layer=1, steps=20, progress=False)
    assert classifier.dtype == torch.float32 and fitted.weight.dtype == torch.bfloat16
    hidden = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    prob = classifier.bind(model)(2, hidden)
    features = classifier.features(get_adapter(model), 2, hidden).float()
    expected = torch.softmax(classifier.net(features), dim=-1)[..., 1]
    assert prob.dtype == torch.float32 and torch.equal(prob, expected)
    out = exits.generate(model, ids[:1, :6], 4, method="calm", exit_conf_type="meta", exit_transform=fitted,
                         meta_classifier=classifier.bind(model), exit_conf_threshold=0.5, exit_min_layer=2,
                         eos_token_id=[])
    assert out.sequences.shape == (1, 10)
