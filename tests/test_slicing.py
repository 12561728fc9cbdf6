"""SliceGPT, dynamic slicing and ShortGPT: equivalence of the rotated model, exact slice fractions,
parameter counts (against the sliced models and a brute-force search), layer scores against a direct
computation, save/load, the sliced OPT through the adapter, and bad input leaving the model untouched.

The tiny models run in float32: fusion + rotation keeps logits within ~1e-6 relative there, well
inside the 1e-4 asked for, so no float64 copies are needed.
"""

import copy
import json

import pytest
import torch

from effllm import records
from effllm.adapters import UnsupportedArchitectureError, get_adapter
from effllm.experiments.slicing_compare import CompareSettings, compare_methods
from effllm.models import load_model, tiny_model
from effllm.slicing import (
    SlicedModelError,
    amplitude_grid,
    equal_parameter_constant_fraction,
    equal_parameter_shortgpt_layers,
    layer_scores,
    load_sliced,
    save_sliced,
    shortgpt_parameter_count,
    slice_fractions,
    slice_model,
    sliced_dims,
    sliced_parameter_count,
)

SLICEGPT_FAMILIES = ["llama", "mistral", "qwen2", "opt"]


def calibration_ids(n=4, seq_len=16, seed=0):
    return torch.randint(3, 250, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def n_parameters(model):
    return sum(p.numel() for p in model.parameters())


def randomise_norms(model):
    """Random init leaves norm scales at 1 and biases at 0, which would not test the folding."""
    adapter = get_adapter(model)
    norms = [n for i in range(adapter.num_layers) for n in adapter.norms(i).values()] + [adapter.final_norm]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=generator))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=generator))


@pytest.mark.parametrize("family", SLICEGPT_FAMILIES)
def test_rotation_without_slicing_keeps_logits(family):
    model, _ = tiny_model(family)
    randomise_norms(model)
    ids, held_out = calibration_ids(), calibration_ids(seed=1)
    before = logits(model, held_out)
    slice_model(model, ids, fractions=[0.0] * get_adapter(model).num_layers)
    assert relative_error(logits(model, held_out), before) < 1e-4
    # the adapter's layer-by-layer forward runs the rotated model too
    torch.testing.assert_close(get_adapter(model).forward(held_out)[0], logits(model, held_out))


def test_zero_slicing_is_a_pure_rotation():
    model, _ = tiny_model("llama")
    adapter = get_adapter(model)
    ids = calibration_ids()
    before = logits(model, ids)
    slice_model(model, ids, mean=0.0)
    full = 64
    for i in range(adapter.num_layers):
        layer = adapter.layer(i)
        for shortcut in (layer.attn_shortcut, layer.mlp_shortcut):  # Q_a^T Q_b of two full bases: orthogonal
            weight = shortcut.weight.double()
            assert weight.shape == (full, full)
            torch.testing.assert_close(weight @ weight.T, torch.eye(full, dtype=torch.float64), atol=1e-5, rtol=0)
    assert adapter.embed_tokens.weight.shape[1] == full
    assert adapter.lm_head.weight.shape[1] == full  # the full head: nothing sliced, nothing lost
    dense, _ = tiny_model("llama")
    shapes = {name: p.shape for name, p in dense.named_parameters()}
    for name, parameter in model.named_parameters():  # nothing sliced: every dense weight keeps its shape
        if "shortcut" not in name:
            assert parameter.shape == shapes.get(name, shapes.get(name.replace("lm_head", "model.embed_tokens"))), name
    assert relative_error(logits(model, ids), before) < 1e-4


@pytest.mark.parametrize("slice_head", [False, True], ids=["full-head", "sliced-head"])
def test_sliced_model_is_smaller_and_matches_the_parameter_formula(slice_head):
    """The last layer writes, and the final norm and LM head read, the full D = 64 by default (SliceGPT's
    do_slice_head=False: DynamicSlicing src/slicegpt/rotate.py:161, 271-274, 286-288), d_3 = 40 with slice_head."""
    model, _ = tiny_model("llama")
    ids = calibration_ids()
    vocab, full, mlp, q_out, kv_out = 384, 64, 128, 64, 32
    fractions = [0.25, 0.5, 0.125, 0.375]
    dims = sliced_dims(fractions, full)
    assert dims == [48, 32, 56, 40]
    n_dense = n_parameters(model)
    slice_model(model, ids, fractions=fractions, slice_head=slice_head)
    adapter = get_adapter(model)

    d_head = 40 if slice_head else full
    expected = vocab * dims[0]  # embeddings
    for i, d in enumerate(dims):
        d_out = dims[i + 1] if i + 1 < len(dims) else d_head
        expected += d * (q_out + 2 * kv_out) + q_out * d  # q, k, v read d dims; o writes d
        expected += 2 * mlp * d + mlp * d_out  # gate, up read d; down writes the next layer's d
        expected += 2 * d  # the two norms
        expected += d * d + d * d_out  # shortcuts: attention -> MLP basis, MLP -> next layer's basis
        assert adapter.attention_projections(i)["q"].weight.shape == (q_out, d)
        assert adapter.mlp_projections(i)["down"].weight.shape == (d_out, mlp)
    assert adapter.layer(3).mlp_shortcut.weight.shape == (d_head, 40)  # [d_out, d_mid] of the last layer
    assert adapter.lm_head.weight.shape == (vocab, d_head) and adapter.final_norm.weight.shape == (d_head,)
    expected += d_head + vocab * d_head  # final norm, untied LM head
    assert n_parameters(model) == expected < n_dense
    assert records.SLICING.get(model)["slice_head"] is slice_head
    out = logits(model, ids)
    assert out.shape == (4, 16, vocab) and torch.isfinite(out).all()


@pytest.mark.parametrize("slice_head", [False, True], ids=["full-head", "sliced-head"])
@pytest.mark.parametrize("family", SLICEGPT_FAMILIES)
def test_parameter_count_formula_matches_the_sliced_model(family, slice_head):
    model, _ = tiny_model(family)
    fractions = [0.25, 0.5, 0.125, 0.375]
    predicted = sliced_parameter_count(model, fractions, slice_head)  # from the dense shapes, nothing sliced
    assert n_parameters(model) == n_parameters(tiny_model(family)[0])
    slice_model(model, calibration_ids(), fractions=fractions, slice_head=slice_head)
    assert n_parameters(model) == predicted


def test_full_head_costs_the_last_layers_sliced_width_in_parameters():
    """Full head minus sliced head, tiny Llama (V = 384, D = 64, MLP 128), last layer kept at d = 40: the head
    and final norm gain (V + 1)(64 - 40), the last down projection 128 (64 - 40), its shortcut 40 (64 - 40)."""
    model, _ = tiny_model("llama")
    fractions = [0.25, 0.5, 0.125, 0.375]
    gap = sliced_parameter_count(model, fractions) - sliced_parameter_count(model, fractions, slice_head=True)
    assert gap == (384 + 1 + 128 + 40) * (64 - 40) == 13272
    n_full = equal_parameter_shortgpt_layers(model, fractions=fractions)
    n_sliced = equal_parameter_shortgpt_layers(model, fractions=fractions, slice_head=True)
    assert n_full <= n_sliced  # a larger SliceGPT model: ShortGPT removes no more layers to match it


def test_equal_parameter_shortgpt_layers_is_the_closest_count():
    """Brute force: remove every possible number of layers for real and slice for real; compare counts."""
    base, _ = tiny_model("llama", num_hidden_layers=6)
    ids = calibration_ids()
    removed_counts = []
    for n_remove in range(6):
        pruned = slice_model(copy.deepcopy(base), ids, mean=n_remove / 6, method="shortgpt")
        assert n_parameters(pruned) == shortgpt_parameter_count(base, n_remove)
        removed_counts.append(n_parameters(pruned))
    chosen = set()
    for mean in (0.1, 0.3, 0.5, 0.7):
        target = n_parameters(slice_model(copy.deepcopy(base), ids, mean=mean))
        gaps = [abs(count - target) for count in removed_counts]
        n = equal_parameter_shortgpt_layers(base, mean=mean)
        assert gaps[n] == min(gaps) and n == gaps.index(min(gaps))
        chosen.add(n)
    assert len(chosen) > 1  # the cases are not all the same answer


def test_amplitude_zero_is_constant_slicing():
    constant, dynamic = tiny_model("llama")[0], tiny_model("llama")[0]
    ids = calibration_ids()
    slice_model(constant, ids, mean=0.25)
    slice_model(dynamic, ids, mean=0.25, amplitude=0.0)
    assert records.SLICING.get(dynamic)["fractions"] == [0.25] * 4
    torch.testing.assert_close(logits(dynamic, ids), logits(constant, ids), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["slicegpt-llama", "slicegpt-opt", "slicehead-llama", "slicehead-opt",
                                  "shortgpt-llama", "shortgpt-gemma3"])
def test_save_and_load_sliced_gives_identical_logits(case, tmp_path):
    """Both head widths round-trip: the full head (default) and a sliced one (``slicehead``)."""
    method, family = case.split("-")
    model, tokenizer = tiny_model(family)
    ids = calibration_ids()
    if method in ("slicegpt", "slicehead"):
        slice_model(model, ids, mean=0.25, amplitude=0.1, slice_head=method == "slicehead")
        head_width = get_adapter(model).lm_head.weight.shape[1]
        assert (head_width < 64) == (method == "slicehead")
    else:
        slice_model(model, ids, mean=0.5, method="shortgpt")
    save_sliced(model, tmp_path / "sliced", tokenizer=tokenizer)
    loaded = load_sliced(tmp_path / "sliced")
    assert not loaded.training
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert n_parameters(loaded) == n_parameters(model)
    assert records.SLICING.get(loaded) == records.SLICING.get(model)
    assert (tmp_path / "sliced" / "tokenizer.json").is_file()
    if method != "shortgpt":
        assert get_adapter(loaded).lm_head.weight.shape == get_adapter(model).lm_head.weight.shape


def _saved(tmp_path, name="sliced", family="llama", mean=0.25):
    model, _ = tiny_model(family)
    slice_model(model, calibration_ids(), mean=mean)
    return save_sliced(model, tmp_path / name)


def test_load_sliced_refuses_missing_corrupt_and_edited_folders(tmp_path):
    with pytest.raises(SlicedModelError, match="effllm-artifact.json is missing: not a saved effllm-sliced"):
        load_sliced(tmp_path)

    folder = _saved(tmp_path, "corrupt")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SlicedModelError, match="model.safetensors does not match the checksum"):
        load_sliced(folder)

    folder, other = _saved(tmp_path, "a", mean=0.25), _saved(tmp_path, "b", mean=0.5)
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(SlicedModelError, match="model.safetensors does not match the checksum"):
        load_sliced(folder)

    # config.json and the recorded layout are inside the checksum: an edited RoPE theta or norm eps would
    # load without an error and give other logits
    folder = _saved(tmp_path, "c")
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = 100.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlicedModelError, match="config.json does not match the checksum"):
        load_sliced(folder)

    folder = _saved(tmp_path, "d")
    seal = json.loads((folder / "effllm-artifact.json").read_text())
    seal["meta"]["layout"]["layers"][0]["norm_eps"] = [1e-2, 1e-2]
    (folder / "effllm-artifact.json").write_text(json.dumps(seal))
    with pytest.raises(SlicedModelError, match="changed after it was written"):
        load_sliced(folder)

    (folder / "effllm-artifact.json").write_text("{not json")
    with pytest.raises(SlicedModelError, match="unreadable"):
        load_sliced(folder)

    folder = _saved(tmp_path, "e")
    (folder / "special_tokens_map.json").write_text("{}")
    with pytest.raises(SlicedModelError, match="holds files"):
        load_sliced(folder)


def test_sliced_folder_saved_by_an_older_effllm_is_refused_with_a_message(tmp_path):
    folder = _saved(tmp_path, "old")
    seal = json.loads((folder / "effllm-artifact.json").read_text())
    (folder / "effllm-artifact.json").unlink()
    (folder / "effllm-sliced.json").write_text(json.dumps({"format": "effllm-sliced/1", **seal["meta"]}))
    with pytest.raises(SlicedModelError, match="not a saved effllm-sliced.*save_sliced"):
        load_sliced(folder)
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="already holds files that are not a saved effllm-sliced"):
        save_sliced(model, folder)


@torch.no_grad()
def test_sliced_opt_runs_through_the_adapter_and_decodes_incrementally():
    model, _ = tiny_model("opt")
    randomise_norms(model)
    ids = calibration_ids(2, 12, seed=3)
    slice_model(model, calibration_ids(), fractions=[0.25, 0.5, 0.125, 0.375])
    adapter = get_adapter(model)
    reference = logits(model, ids)
    torch.testing.assert_close(adapter.forward(ids)[0], reference)

    cache = adapter.new_cache()  # prefill 5 tokens, then one at a time with the KV cache
    pieces = [adapter.forward(ids[:, :5], cache=cache)[0]]
    pieces += [adapter.forward(ids[:, t : t + 1], cache=cache)[0] for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, rtol=1e-4, atol=1e-4)

    full, kv_only = adapter.new_cache(), adapter.new_cache()  # append_kv (CALM) on the sliced layers
    for cache in (full, kv_only):
        adapter.forward(ids[:, :8], cache=cache)
    hidden = adapter.embed(ids[:, 8:9], cache=full)
    contexts = [adapter.context(hidden, cache=cache) for cache in (full, kv_only)]
    for i in range(adapter.num_layers):
        adapter.append_kv(i, hidden, contexts[1])
        hidden = adapter.run_layer(i, hidden, contexts[0])  # the next layer's (narrower) input
        torch.testing.assert_close(full.layers[i].keys, kv_only.layers[i].keys)
        torch.testing.assert_close(full.layers[i].values, kv_only.layers[i].values)

    prompt = ids[:1, :6]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                               pad_token_id=1)
    assert torch.equal(generated[0, 6:], logits(model, generated[:, :-1])[0, 5:].argmax(-1))


def test_compare_methods_rows_match_slicing_each_copy_directly():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    ids = calibration_ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held_out = calibration_ids(seed=1)
    table = compare_methods(model, ids, [0.2, 0.5], amplitude=0.1,
                            evaluate=lambda m: {"first_logit": logits(m, held_out)[0, 0, 0].item()},
                            settings=CompareSettings(progress=False))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the original stays dense
    assert list(zip(table["mean"], table["method"], strict=True)) == [
        (0.0, "dense"), (0.2, "constant"), (0.2, "dynamic"), (0.2, "shortgpt"),
        (0.5, "constant"), (0.5, "dynamic"), (0.5, "shortgpt")]
    for mean in (0.2, 0.5):
        rows = table[table["mean"] == mean].set_index("method")
        reference = slice_model(copy.deepcopy(model), ids, mean=mean, amplitude=0.1)  # the same slicing, directly
        assert rows.loc["dynamic", "dims"] == records.SLICING.get(reference)["dims"]
        assert rows.loc["dynamic", "first_logit"] == logits(reference, held_out)[0, 0, 0].item()
        assert rows.loc["constant", "parameters"] == sliced_parameter_count(model, [mean] * 6)
        n_remove = equal_parameter_shortgpt_layers(model, mean=mean)
        assert rows.loc["shortgpt", "layers"] == 6 - n_remove
        assert rows.loc["shortgpt", "parameters"] == shortgpt_parameter_count(model, n_remove)
    assert table["params_ratio"].iloc[0] == 1.0


def test_sliced_model_generates_with_the_kv_cache():
    model, _ = tiny_model("qwen2")
    ids = calibration_ids()
    slice_model(model, ids, mean=0.3)
    prompt = ids[:1, :8]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    # greedy decoding with the cache picks the argmax of a full forward at every step
    full = logits(model, generated[:, :-1])[0, 7:].argmax(-1)
    assert torch.equal(generated[0, 8:], full)


def test_slice_fractions_average_exactly_the_mean():
    scores = torch.tensor([0.0, 0.3, 1.0, 0.7, 0.2, 0.9], dtype=torch.float64)
    fractions = slice_fractions(scores, mean=0.25, amplitude=0.15)
    assert fractions.dtype == torch.float64
    assert abs(fractions.mean().item() - 0.25) < 1e-15
    assert torch.equal(torch.argsort(fractions), torch.argsort(scores))  # more redundant -> sliced more
    assert fractions.min().item() == pytest.approx(0.25 - 0.15)
    assert torch.equal(slice_fractions(scores, 0.25, 0.0), torch.full((6,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("mean, amplitude", [(1.0, 0.0), (-0.1, 0.0), (0.25, 0.3), (0.5, -0.1)])
def test_slice_fractions_reject_bad_input(mean, amplitude):
    with pytest.raises(ValueError, match=r"\[0, 1\)|amplitude"):
        slice_fractions(torch.tensor([0.0, 0.5, 1.0]), mean, amplitude)


def test_dynamic_slicing_through_slice_model():
    model, _ = tiny_model("llama")
    ids = calibration_ids()
    expected = slice_fractions(layer_scores(model, ids, "lr"), 0.25, 0.1)
    slice_model(model, ids, mean=0.25, amplitude=0.1)
    adapter = get_adapter(model)
    dims = [adapter.attention_projections(i)["q"].weight.shape[1] for i in range(adapter.num_layers)]
    assert dims == sliced_dims(expected, 64)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_layer_scores_match_the_hidden_states(family):
    model, _ = tiny_model(family)
    ids = calibration_ids()
    _, states = get_adapter(model).forward(ids, output_hidden_states=True)
    cos = torch.stack([
        torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1)
        for i in range(len(states) - 1)
    ])  # [L, batch, seq]
    distance = (1 - cos).sum(dim=(1, 2))
    lr = 1 - (distance - distance.min()) / (distance.max() - distance.min())
    bi = 1 - cos.mean(dim=(1, 2))
    torch.testing.assert_close(layer_scores(model, ids, "lr", batch_size=3, last_layer="raw"), lr, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer_scores(model, ids, "bi", batch_size=3), bi, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "opt", "mistral", "gemma3"])
def test_shortgpt_removes_the_lowest_influence_layers(family):
    model, _ = tiny_model(family, num_hidden_layers=6)
    ids = calibration_ids()
    adapter = get_adapter(model)
    layers = list(adapter.layers)
    influence = layer_scores(model, ids, "bi")
    lowest = set(torch.argsort(influence)[:2].tolist())
    slice_model(model, ids, mean=1 / 3, method="shortgpt")
    kept = [layer for i, layer in enumerate(layers) if i not in lowest]
    adapter = get_adapter(model)
    assert list(adapter.layers) == kept and model.config.num_hidden_layers == 4
    out = logits(model, ids)
    torch.testing.assert_close(adapter.forward(ids)[0], out)
    prompt = ids[:1, :6]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(generated[0, 6:], logits(model, generated[:, :-1])[0, 5:].argmax(-1))


BAD_CALLS = {
    "mean 1": dict(mean=1.0),
    "mean negative": dict(mean=-0.1),
    "mean 1 dynamic": dict(mean=1.0, amplitude=0.1),
    "fractions 2-D": dict(fractions=[[0.1, 0.2], [0.3, 0.4]]),
    "scores wrong length": dict(mean=0.2, amplitude=0.1, scores=torch.ones(3)),
    "wrong length": dict(fractions=[0.1, 0.2, 0.3]),
    "fraction 1": dict(fractions=[0.1, 1.0, 0.1, 0.1]),
    "no dimension left": dict(fractions=[0.1, 0.995, 0.1, 0.1]),
    "mean and fractions": dict(mean=0.2, fractions=[0.2] * 4),
    "amplitude too large": dict(mean=0.2, amplitude=0.5),
    "shortgpt mean 1": dict(mean=1.0, method="shortgpt"),
    "unknown method": dict(mean=0.2, method="wanda"),
    "calibration 1-D": dict(mean=0.2),
    "calibration empty": dict(mean=0.2),
    "calibration float": dict(mean=0.2),
    "calibration outside the vocabulary": dict(mean=0.2, method="shortgpt"),
}
BAD_CALIBRATION = {
    "calibration 1-D": lambda ids: ids[0],
    "calibration empty": lambda ids: ids[:0],
    "calibration float": lambda ids: ids.float(),
    "calibration outside the vocabulary": lambda ids: ids + 1000,
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_leaves_the_model_untouched(case):
    model, _ = tiny_model("llama")
    ids = calibration_ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\S"):
        slice_model(model, BAD_CALIBRATION.get(case, lambda x: x)(ids), **BAD_CALLS[case])
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("family, method", [("gpt2", "slicegpt"), ("gemma3", "slicegpt"), ("t5", "slicegpt"),
                                            ("gpt2", "shortgpt"), ("t5", "shortgpt"), ("opt-post-norm", "slicegpt")])
def test_unsupported_family_is_refused_untouched(family, method):
    if family == "opt-post-norm":  # opt-350m's layout: LayerNorm after each residual add
        model, _ = tiny_model("opt", do_layer_norm_before=False)
    else:
        model, _ = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match=f"{method} supports|pre-norm OPT"):
        slice_model(model, calibration_ids(), mean=0.2, method=method)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_slicing_a_sliced_model_again_is_refused_untouched():
    model, _ = tiny_model("llama")
    ids = calibration_ids()
    slice_model(model, ids, mean=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("slicegpt", "shortgpt"):
        with pytest.raises(ValueError, match="already sliced"):
            slice_model(model, ids, mean=0.25, method=method)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_parameter_helpers_reject_bad_input():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="4 layers"):
        sliced_parameter_count(model, [0.25] * 3)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        shortgpt_parameter_count(model, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        equal_parameter_shortgpt_layers(model, mean=1.0)
    with pytest.raises(ValueError, match="not both"):
        equal_parameter_shortgpt_layers(model, mean=0.2, fractions=[0.2] * 4)


# A rotation that changes nothing must change nothing, up to the rounding of the rotated weights: float32 keeps the
# logits to 7e-6 of their range; bfloat16's 8-bit mantissa to 0.04 (measured on SmolLM2), while slicing 10% of the
# width moves them by 0.8 in either dtype, so the bound still separates "rotated" from "changed".
ROTATION_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1}


@pytest.mark.embedded
@pytest.mark.parametrize("dtype", list(ROTATION_TOLERANCE), ids=str)
def test_rotation_keeps_smollm2_logits(dtype):
    model, _ = load_model("smollm2-135m", dtype=dtype)
    ids = torch.randint(3, 40000, (2, 32), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(3, 40000, (1, 32), generator=torch.Generator().manual_seed(1))
    before = logits(model, held_out).float()
    slice_model(model, ids, mean=0.0)
    assert relative_error(logits(model, held_out).float(), before) < ROTATION_TOLERANCE[dtype]


@pytest.mark.parametrize("ids, message", [
    (torch.ones(0, 8, dtype=torch.long), r"\[batch >= 1, length >= 1\]; got shape \(0, 8\)"),
    (torch.ones(2, 8), "integer token ids.*float32"),
    (torch.full((2, 8), -1), "ids -1..-1, outside this model's vocabulary 0..383"),
])
def test_layer_scores_reject_bad_calibration(ids, message):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        layer_scores(model, ids)


# ------------------------------------------------------------------------------------------------
# All or nothing: an interrupted ShortGPT is undone, an interrupted SliceGPT marks the model


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")], ids=["ctrl-c", "error"])
def test_interrupted_slicegpt_marks_the_model_and_later_calls_refuse_it(error, monkeypatch, tmp_path):
    from effllm.models import IncompleteModelError
    from effllm.pruning import prune, save_pruned
    from effllm.slicing import surgery

    model, _ = tiny_model("llama")
    original, calls = surgery.pca, [0]

    def pca(covariance):
        calls[0] += 1
        if calls[0] == 4:  # embeddings, layer 0 (middle, output), then layer 1's middle signal
            raise error
        return original(covariance)

    monkeypatch.setattr(surgery, "pca", pca)
    with pytest.raises(type(error)):
        slice_model(model, calibration_ids(), mean=0.25)
    monkeypatch.undo()
    expected = (f"slicing \\(SliceGPT.*was interrupted at layer 1 of 4.*by {type(error).__name__}.*partly sliced: "
                "reload it")
    for call in (lambda: slice_model(model, calibration_ids(), mean=0.25),
                 lambda: slice_model(model, calibration_ids(), mean=0.25, method="shortgpt"),
                 lambda: save_sliced(model, tmp_path / "sliced"),
                 lambda: prune(model, "magnitude", 0.5, progress=False),
                 lambda: save_pruned(model, tmp_path / "pruned", masks={})):
        with pytest.raises(IncompleteModelError, match=expected):
            call()
    assert not (tmp_path / "sliced").exists() and not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")], ids=["ctrl-c", "error"])
def test_interrupted_shortgpt_puts_every_layer_back(error, monkeypatch):
    model, _ = tiny_model("gemma3")  # layer_types and layer_idx must come back too
    ids = calibration_ids()
    before, config = logits(model, ids), model.config.to_dict()
    adapter_class = type(get_adapter(model))
    original, calls = adapter_class.attention, [0]

    def attention(self, i):
        calls[0] += 1
        if calls[0] == 4 + 2:  # the removal has begun: layers deleted, the renumbering half done
            raise error
        return original(self, i)

    monkeypatch.setattr(adapter_class, "attention", attention)
    with pytest.raises(type(error)):
        slice_model(model, ids, mean=0.5, method="shortgpt")
    monkeypatch.undo()
    assert get_adapter(model).num_layers == 4 and model.config.to_dict() == config
    assert [get_adapter(model).attention(i).layer_idx for i in range(4)] == [0, 1, 2, 3]
    assert torch.equal(logits(model, ids), before)
    assert not records.INCOMPLETE.present(model)
    reference, _ = tiny_model("gemma3")
    slice_model(reference, ids, mean=0.5, method="shortgpt")
    slice_model(model, ids, mean=0.5, method="shortgpt")  # and it can be sliced now
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_equal_parameter_constant_fraction_is_the_closest_constant_size():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    hidden = get_adapter(model).hidden_size
    lr = torch.tensor([0.0, 0.9, 1.0, 0.5, 0.7, 0.2], dtype=torch.float64)
    for mean in (0.1, 0.3, 0.5):
        dynamic = slice_fractions(lr, mean, 0.1)
        target = sliced_parameter_count(model, dynamic)
        fraction = equal_parameter_constant_fraction(model, dynamic)
        gaps = {d: abs(sliced_parameter_count(model, [1 - d / hidden] * 6) - target) for d in range(1, hidden + 1)}
        assert abs(sliced_parameter_count(model, [fraction] * 6) - target) == min(gaps.values())  # brute force
    assert equal_parameter_constant_fraction(model, [0.25] * 6) == pytest.approx(0.25)  # constant maps to itself


def test_compare_methods_matches_parameters_and_passes_rows():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    ids = calibration_ids()
    seen = []
    settings = CompareSettings(progress=False, match_parameters=True, pass_row=True)
    table = compare_methods(model, ids, [0.3], amplitude=0.1, settings=settings,
                            evaluate=lambda m, row: seen.append(row) or {"layers_seen": get_adapter(m).num_layers})
    assert list(zip(table.method, table.matched, strict=True)) == [
        ("dense", ""), ("constant", "mean"), ("dynamic", "mean"), ("shortgpt", "parameters"),
        ("constant", "parameters")]
    assert [(r["method"], r["matched"]) for r in seen] == list(zip(table.method, table.matched, strict=True))
    rows = table.set_index(["method", "matched"])
    dynamic = slice_fractions(layer_scores(model, ids, "lr"), 0.3, 0.1)
    matched = equal_parameter_constant_fraction(model, dynamic)
    assert rows.loc[("constant", "parameters"), "slice_fraction"] == pytest.approx(matched)
    assert rows.loc[("constant", "parameters"), "parameters"] == sliced_parameter_count(model, [matched] * 6)
    assert rows.loc[("dynamic", "mean"), "slice_fraction"] == pytest.approx(0.3)
    assert rows.loc[("constant", "mean"), "parameters"] == sliced_parameter_count(model, [0.3] * 6)


# ------------------------------------------------------------------------------------------------
# As the authors' code computes it (issue 31): LR's last layer, the amplitude grid, the sweep in the comparison


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lr_last_layer_compares_its_input_with_the_normed_output(family):
    """DynamicSlicing short_hf.py:76-88 adds sum(1 - cos(hiddens[i], hiddens[i+1])) per layer over HF's
    output_hidden_states (short_hf.py:137-141), whose last entry is after the final norm; calculate_LR.py:82-87
    turns the sums into LR = 1 - minmax. Reference by hand from the model's own modules: the adapter's raw states,
    the final norm applied to the last one, which is what HF's hidden_states[-1] holds."""
    model, _ = tiny_model(family)
    randomise_norms(model)  # a final norm of ones would scale the state only: the cosine could not tell
    ids = calibration_ids()
    adapter = get_adapter(model)
    _, raw = adapter.forward(ids, output_hidden_states=True)
    with torch.no_grad():
        normed = raw[:-1] + [adapter.final_norm(raw[-1])]
        hf = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hf[-1], normed[-1])  # the fact the authors' code rests on

    def distances(states):
        return torch.stack([(1 - torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(),
                                                                       dim=-1)).sum() for i in range(len(states) - 1)])

    n_tokens = ids.numel()
    bi_normed = layer_scores(model, ids, "bi", last_layer="normed")
    bi_raw = layer_scores(model, ids, "bi", last_layer="raw")
    torch.testing.assert_close(bi_normed, distances(normed) / n_tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(bi_raw, distances(raw) / n_tokens, atol=1e-6, rtol=0)
    assert torch.equal(bi_normed[:-1], bi_raw[:-1])  # every other layer: the same numbers
    assert abs(bi_normed[-1] - bi_raw[-1]) > 1e-3  # the last one moves
    assert torch.equal(layer_scores(model, ids, "bi"), bi_raw)  # BI (ShortGPT) keeps the raw output by default

    lr = layer_scores(model, ids, "lr")  # the default: normed, as the authors run it
    expected = distances(normed)
    torch.testing.assert_close(lr, 1 - (expected - expected.min()) / (expected.max() - expected.min()),
                               atol=1e-5, rtol=0)
    assert torch.equal(lr, layer_scores(model, ids, "lr", last_layer="normed"))
    assert not torch.allclose(lr, layer_scores(model, ids, "lr", last_layer="raw"), atol=1e-3)


def test_layer_scores_reject_an_unknown_last_layer():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="last_layer must be one of \\('normed', 'raw'\\).*got 'final'"):
        layer_scores(model, calibration_ids(), last_layer="final")


def test_amplitude_grid_is_the_authors_arange():
    """DynamicSlicing experiments/mean_cut_accuracy_experiments.py:69: np.arange(0, M + 0.01, 0.02)."""
    import numpy as np

    for mean in (0.1, 0.2, 0.25, 0.3, 0.35, 0.4):
        authors = np.arange(0, mean + 0.01, 0.02)
        grid = amplitude_grid(mean)
        assert len(grid) == len(authors) and np.allclose(grid, authors, rtol=0, atol=1e-12)
    assert amplitude_grid(0.3) == [round(0.02 * k, 12) for k in range(16)] and amplitude_grid(0.3)[-1] == 0.3
    assert amplitude_grid(0.35)[-1] == 0.34 and len(amplitude_grid(0.35)) == 18
    assert amplitude_grid(0.335)[-1] == 0.32  # arange's 0.34 > M would slice the least redundant layer below 0
    scores = torch.tensor([0.0, 0.4, 1.0, 0.7], dtype=torch.float64)
    assert slice_fractions(scores, 0.3, amplitude_grid(0.3)[-1]).min() == 0  # not arange's 0.30000000000000004
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        amplitude_grid(1.0)


def test_compare_methods_sweeps_the_amplitude_grid():
    model, _ = tiny_model("llama", num_hidden_layers=6)
    ids = calibration_ids()
    table = compare_methods(model, ids, [0.1], amplitude=0.04, evaluate=lambda m: {},
                            settings=CompareSettings(progress=False, sweep_means=(0.1,)))
    sweep = table[table.matched == "sweep"]
    assert sweep.amplitude.tolist() == [0.02, 0.06, 0.08, 0.1]  # amplitude_grid(0.1) less A = 0 and A = 0.04
    assert set(sweep.method) == {"dynamic"} and (sweep["mean"] == 0.1).all()
    assert table.set_index(["method", "matched"]).loc[("dynamic", "mean"), "amplitude"] == 0.04
    for row in sweep.itertuples():
        reference = slice_model(copy.deepcopy(model), ids, mean=0.1, amplitude=row.amplitude)
        assert row.dims == records.SLICING.get(reference)["dims"]
    with pytest.raises(ValueError, match=r"sweep_means \[0.2\] are not among means \[0.1\]"):
        compare_methods(model, ids, [0.1], 0.04, lambda m: {}, settings=CompareSettings(sweep_means=(0.2,)))


@pytest.mark.embedded
def test_smollm2_parameter_counts_with_the_full_and_the_sliced_head():
    """SmolLM2-135M (30 layers, D = 576, V = 49152, MLP 1536) at a constant 25%: d = 432 everywhere. The full head
    (DynamicSlicing src/slicegpt/rotate.py:271-274, 286-288) adds (V + 1 + 1536 + 432)(576 - 432) parameters over
    a sliced one: the head and final norm read 576, the last down projection and its shortcut write 576."""
    model, _ = load_model("smollm2-135m", dtype=torch.float32)
    full = sliced_parameter_count(model, [0.25] * 30)
    sliced = sliced_parameter_count(model, [0.25] * 30, slice_head=True)
    assert (full, sliced) == (140678784, 133317360)
    assert full - sliced == (49152 + 1 + 1536 + 432) * (576 - 432)
    assert equal_parameter_shortgpt_layers(model, mean=0.3) == 1
    assert equal_parameter_shortgpt_layers(model, mean=0.3, slice_head=True) == 3
