"""Pruning: Wanda's masks equal a direct computation, N:M and per-row counts are exact, SparseGPT beats
magnitude on reconstruction, masks round-trip and never half-apply, bad input fails before any change;
mask similarity (Jaccard) equals a brute-force set computation and is 1/3 for random 50% masks."""

import json

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from effllm import io, pruning
from effllm.adapters import get_adapter
from effllm.models import IncompleteModelError, fingerprint, tiny_model
from effllm.pruning import (
    MaskMismatchError,
    apply_masks,
    jaccard_levels,
    jaccard_matrix,
    linear_roles,
    load_masks,
    load_pruned,
    magnitude_mask,
    mask_jaccard,
    pairwise_jaccard,
    prune,
    random_mask_jaccard,
    save_masks,
    save_pruned,
    sparsegpt_prune,
    sparsity_report,
    wanda_mask,
)

FAMILIES = ["llama", "opt", "gpt2"]  # gpt2: Conv1D weights stored [in, out]


def two_layer_model(family):
    """A tiny model with two decoder layers: enough for layer-by-layer order, half the time of four."""
    return tiny_model(family, num_hidden_layers=2)[0]


def calibration_ids(n_samples=6, seq_len=24, seed=0):
    return torch.randint(3, 250, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))


def as_out_in(model, name, mask_or_weight):
    """A mask or weight in the [out, in] orientation of the named module."""
    module = dict(model.named_modules())[name]
    return mask_or_weight.t() if isinstance(module, Conv1D) else mask_or_weight


def snapshot(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def layer_inputs(model, ids, layer=0):
    """Every token's input to each linear of ``layer``, from a plain forward hook on the full model: [tokens, in]."""
    inputs = {}
    handles = [
        module.register_forward_hook(lambda _m, args, _out, name=name: inputs.setdefault(name, []).append(args[0]))
        for name, module in get_adapter(model).linears(layer).items()
    ]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for name, xs in inputs.items()}


# ------------------------------------------------------------------------------------------------
# Correctness of the selections


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_masks_equal_direct_per_row_computation(family, pattern):
    model, _ = tiny_model(family)
    ids = calibration_ids()
    inputs = layer_inputs(model, ids)
    original = {name: get_adapter(model).weight(module).clone() for name, module in get_adapter(model).linears(0).items()}
    masks = prune(model, "wanda", 0.5 if pattern == "unstructured" else None, pattern, calibration=ids, progress=False)
    for name, W in original.items():
        scores = W.abs() * inputs[name].pow(2).sum(0).sqrt()  # [out, in]
        if pattern == "unstructured":
            rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each weight within its output row
            expected = rank < int(W.shape[1] * 0.5)
        else:
            groups = scores.reshape(W.shape[0], -1, 4)
            expected = (groups.argsort(dim=2).argsort(dim=2) < 2).reshape(W.shape)
        assert torch.equal(as_out_in(model, name, masks[name]), expected), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_every_nm_group_has_exactly_n_zeros(family, method, pattern):
    n, m = map(int, pattern.split(":"))
    model = two_layer_model(family)
    masks = prune(model, method, None, pattern, calibration=calibration_ids(), progress=False)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        out_in = as_out_in(model, name, mask)
        assert (out_in.reshape(out_in.shape[0], -1, m).sum(dim=2) == n).all(), name
        assert (modules[name].weight[mask] == 0).all(), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_sparsity_is_exact_in_every_row(family, method):
    model, _ = tiny_model(family)
    masks = prune(model, method, 0.3, calibration=calibration_ids(), progress=False)
    for name, mask in masks.items():
        out_in = as_out_in(model, name, mask)
        assert (out_in.sum(dim=1) == int(out_in.shape[1] * 0.3)).all(), name


def test_sparsegpt_unstructured_sparsity_is_exact_per_block():
    model, _ = tiny_model("llama")  # every input size is 64 or 128: one SparseGPT block of 128 columns
    masks = prune(model, "sparsegpt", 0.3, calibration=calibration_ids(), progress=False)
    for name, mask in masks.items():
        assert int(mask.sum()) == int(mask.numel() * 0.3), name


@pytest.mark.parametrize("n_m", [None, (2, 4), (4, 8)])
def test_magnitude_equals_wanda_when_input_norms_are_equal(n_m):
    model, _ = tiny_model("llama")
    adapter = get_adapter(model)
    for i in range(adapter.num_layers):
        for name, module in adapter.linears(i).items():
            W = adapter.weight(module)
            equal_norms = torch.full((W.shape[1],), 7.0)
            assert torch.equal(wanda_mask(W, equal_norms, 0.5, n_m), magnitude_mask(W, 0.5, n_m)), name


def test_magnitude_per_matrix_option_is_exact_per_matrix():
    model, _ = tiny_model("llama")
    masks = prune(model, "magnitude", 0.3, per_row=False, progress=False)
    for name, mask in masks.items():
        assert int(mask.sum()) == int(mask.numel() * 0.3), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_reconstructs_layer_outputs_better_than_magnitude(family, n_m):
    model, _ = tiny_model(family)
    adapter = get_adapter(model)
    inputs = layer_inputs(model, calibration_ids(n_samples=8, seq_len=32))
    for name, module in adapter.linears(0).items():
        W = adapter.weight(module).detach()
        X = inputs[name]  # [tokens, in]
        hessian = 2 * X.t() @ X / X.shape[0]
        W_sparsegpt, mask_sparsegpt = sparsegpt_prune(W, hessian, 0.5, n_m)
        mask_magnitude = magnitude_mask(W, 0.5, n_m)
        assert int(mask_sparsegpt.sum()) == int(mask_magnitude.sum())  # same density
        assert (W_sparsegpt[mask_sparsegpt] == 0).all()
        error_sparsegpt = torch.linalg.norm((W - W_sparsegpt) @ X.t())
        error_magnitude = torch.linalg.norm((W * mask_magnitude) @ X.t())
        assert error_sparsegpt < error_magnitude, name


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsegpt_in_prune_equals_the_algorithm_on_hooked_inputs(family):
    """prune() feeds SparseGPT the Hessian 2 X^T X / n of the layer's real inputs and writes its result back."""
    model = two_layer_model(family)
    adapter = get_adapter(model)
    ids = calibration_ids()
    inputs = layer_inputs(model, ids)
    expected = {}
    for name, module in adapter.linears(0).items():
        X = inputs[name]
        expected[name] = sparsegpt_prune(adapter.weight(module), 2 * X.t() @ X / X.shape[0], 0.5)
    masks = prune(model, "sparsegpt", 0.5, calibration=ids, progress=False)
    for name, module in adapter.linears(0).items():
        weight, mask = expected[name]
        assert torch.equal(as_out_in(model, name, masks[name]), mask), name
        torch.testing.assert_close(adapter.weight(module), weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruned_weights_are_zero_where_masked_and_model_stays_finite(family, method):
    model = two_layer_model(family)
    adapter = get_adapter(model)
    embeddings = adapter.embed_tokens.weight.clone()
    head = adapter.lm_head.weight.clone()
    ids = calibration_ids()
    masks = prune(model, method, 0.5, calibration=ids, progress=False)
    expected_names = {name for i in range(adapter.num_layers) for name in adapter.linears(i)}
    assert set(masks) == expected_names
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == modules[name].weight.shape
        assert (modules[name].weight[mask] == 0).all(), name
    assert torch.equal(adapter.embed_tokens.weight, embeddings) and torch.equal(adapter.lm_head.weight, head)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    report = sparsity_report(model, masks)
    assert len(report) == len(masks) and (report.zeros >= report.masked).all()
    assert report.sparsity.between(0.5, 0.51).all()
    assert set(report.kind) <= {"q", "k", "v", "o", "qkv", "gate", "up", "down"}


def test_layers_are_calibrated_on_pruned_outputs_below():
    """Layer 1's Wanda masks follow the inputs produced by the pruned layer 0, not the dense one."""
    ids = calibration_ids()
    pruned, _ = tiny_model("llama")
    masks = prune(pruned, "wanda", 0.5, calibration=ids, progress=False)
    dense, _ = tiny_model("llama")
    adapter = get_adapter(dense)
    apply_masks(dense, {name: mask for name, mask in masks.items() if ".layers.0." in name})
    inputs = layer_inputs(dense, ids, layer=1)
    for name, module in adapter.linears(1).items():
        expected = wanda_mask(adapter.weight(module), inputs[name].pow(2).sum(0), 0.5)
        assert torch.equal(masks[name], expected), name


# ------------------------------------------------------------------------------------------------
# Saving, loading, applying


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masks_and_pruned_model_round_trip(family, tmp_path):
    model, _ = tiny_model(family)
    ids = calibration_ids()
    masks = prune(model, "wanda", 0.5, calibration=ids, progress=False)
    path = save_masks(masks, tmp_path / "masks.safetensors", model)
    for loaded in (load_masks(path), load_masks(path, model)):
        assert loaded.keys() == masks.keys()
        assert all(torch.equal(loaded[name], masks[name]) for name in masks)

    dense, _ = tiny_model(family)
    apply_masks(dense, load_masks(path, dense))
    assert_unchanged(dense, {k: v for k, v in model.state_dict().items()})  # Wanda updates no weights

    save_pruned(model, tmp_path / "pruned")
    reloaded, reloaded_masks = load_pruned(tmp_path / "pruned")
    assert all(torch.equal(reloaded_masks[name], masks[name]) for name in masks)
    assert_unchanged(reloaded, model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_masks_for_another_model_raise_and_change_nothing(tmp_path):
    source, _ = tiny_model("llama")
    masks = prune(source, "magnitude", 0.5, progress=False)
    path = save_masks(masks, tmp_path / "masks.safetensors", source)
    others = [
        tiny_model("opt")[0],  # other names
        tiny_model("llama", num_hidden_layers=3)[0],  # the first 21 masks fit, the last 7 name no module
        tiny_model("llama", intermediate_size=96)[0],  # same names, other shapes
    ]
    for other in others:
        before = snapshot(other)
        with pytest.raises(MaskMismatchError, match="another model"):
            apply_masks(other, masks)
        assert_unchanged(other, before)
        with pytest.raises(MaskMismatchError):
            load_masks(path, other)
    # Same type, depth and shapes but a mask of the wrong dtype
    same, _ = tiny_model("llama", seed=1)
    before = snapshot(same)
    with pytest.raises(MaskMismatchError, match="bool"):
        apply_masks(same, {**masks, next(iter(masks)): next(iter(masks.values())).float()})
    assert_unchanged(same, before)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error, raised before any weight changes

BAD_INPUTS = [
    (dict(method="wanda", sparsity=-0.1), "sparsity must be a fraction in \\[0, 1\\).*-0.1"),
    (dict(method="wanda", sparsity=1.0), "sparsity must be a fraction in \\[0, 1\\).*1.0"),
    (dict(method="magnitude", sparsity=1.5), "sparsity must be a fraction in \\[0, 1\\).*1.5"),
    (dict(method="magnitude", sparsity=0.5, pattern="4:4"), "'4:4' gives N=4, M=4.*1 <= N < M"),
    (dict(method="magnitude", sparsity=0.5, pattern="5:4"), "'5:4' gives N=5, M=4.*1 <= N < M"),
    (dict(method="magnitude", sparsity=0.5, pattern="0:4"), "'0:4' gives N=0, M=4.*1 <= N < M"),
    (dict(method="magnitude", sparsity=0.5, pattern="two:four"), "Cannot parse pattern 'two:four'.*'N:M'"),
    (dict(method="magnitude", sparsity=0.5, pattern="2-4"), "Cannot parse pattern '2-4'"),
    (dict(method="magnitude", sparsity=0.3, pattern="2:4"), "sparsity=0.3 does not match pattern '2:4'.*0.5"),
    (dict(method="magnitude", sparsity=None), "sparsity=None is only allowed with an N:M pattern"),
    (dict(method="magnitude", sparsity=None, pattern="3:7"), "multiple of M=7.*has 64 inputs"),
    (dict(method="obs", sparsity=0.5), "Unknown pruning method 'obs'.*magnitude, wanda, sparsegpt"),
    (dict(method="wanda", sparsity=0.5, calibration=None), "'wanda' needs calibration token ids"),
    (dict(method="sparsegpt", sparsity=0.5, calibration=None), "'sparsegpt' needs calibration token ids"),
    (dict(method="wanda", sparsity=0.5, calibration=torch.ones(2, 8)), "integer token ids.*float32"),
    (dict(method="wanda", sparsity=0.5, calibration=torch.ones(0, 8, dtype=torch.long)),
     r"calibration.*\[batch >= 1, length >= 1\]; got shape \(0, 8\)"),
    (dict(method="sparsegpt", sparsity=0.5, calibration=torch.ones(4, 0, dtype=torch.long)),
     r"calibration.*got shape \(4, 0\)"),
    (dict(method="wanda", sparsity=0.5, calibration=torch.full((2, 8), 384)),
     "ids 384..384, outside this model's vocabulary 0..383"),
]


@pytest.mark.parametrize("arguments, message", BAD_INPUTS)
def test_bad_input_raises_before_changing_anything(arguments, message):
    model, _ = tiny_model("llama")
    before = snapshot(model)
    arguments = {"calibration": calibration_ids(), "progress": False, **arguments}
    with pytest.raises(ValueError, match=message):
        prune(model, **arguments)
    assert_unchanged(model, before)


def test_unknown_method_option_raises():
    model, _ = tiny_model("llama")
    with pytest.raises(TypeError, match="blocksize.*'wanda'"):
        prune(model, "wanda", 0.5, calibration=calibration_ids(), blocksize=64, progress=False)


# ------------------------------------------------------------------------------------------------
# Item-2 gaps: magnitude == Wanda end to end, SparseGPT's option checks are made before any change


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_magnitude_equals_prune_wanda_when_input_norms_are_equal(monkeypatch, pattern):
    """Through prune() itself: feed Wanda inputs whose column norms are all equal and it picks magnitude's masks."""
    from effllm.pruning import layerwise  # where prune() looks up its helpers

    def equal_norms(runner, i, linears, method):
        runner.run(i)  # the layer still runs, as in the real statistics pass
        return {name: torch.full((runner.adapter.weight(m).shape[1],), 3.0)
                for name, m in linears.items()}, {}

    sparsity = 0.5 if pattern == "unstructured" else None
    magnitude = prune(tiny_model("llama")[0], "magnitude", sparsity, pattern, progress=False)
    monkeypatch.setattr(layerwise, "_input_statistics", equal_norms)
    wanda = prune(tiny_model("llama")[0], "wanda", sparsity, pattern, calibration=calibration_ids(), progress=False)
    assert magnitude.keys() == wanda.keys()
    assert all(torch.equal(magnitude[name], wanda[name]) for name in magnitude)


def test_sparsegpt_blocksize_not_multiple_of_m_raises_before_changing_anything():
    model, _ = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="blocksize \\(6\\) must be a multiple of M=4"):
        prune(model, "sparsegpt", None, "2:4", calibration=calibration_ids(), blocksize=6, progress=False)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------
# Mask similarity (Jaccard)


def random_masks(shapes, sparsity, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=generator) < sparsity for name, shape in shapes.items()}


def test_jaccard_equals_brute_force_set_computation():
    model, _ = tiny_model("llama")
    roles = linear_roles(model)
    shapes = {name: tuple(module.weight.shape) for name, module in model.named_modules() if name in roles}
    a, b = random_masks(shapes, 0.5, seed=1), random_masks(shapes, 0.3, seed=2)
    table = jaccard_levels(mask_jaccard(a, b, roles))

    def positions(masks, names):
        return {(name, int(i)) for name in names for i in masks[name].flatten().nonzero().flatten()}

    def brute(names):
        pa, pb = positions(a, names), positions(b, names)
        return len(pa & pb) / len(pa | pb)

    for row in table.itertuples():
        if row.level == "linear":
            names = [row.name]
        elif row.level == "layer":
            names = [name for name, (layer, _) in roles.items() if layer == row.layer]
        else:
            names = list(roles)
        assert row.jaccard == pytest.approx(brute(names), abs=1e-12), (row.level, row.name)
    assert set(table.level) == {"linear", "layer", "model"}
    assert (table.level == "layer").sum() == get_adapter(model).num_layers
    assert set(table[table.level == "linear"].kind) == {"q", "k", "v", "o", "gate", "up", "down"}


def test_two_independent_random_half_masks_have_jaccard_one_third():
    shapes = {f"model.layers.{i}.mlp.{kind}": (512, 512) for i in range(2) for kind in ("up_proj", "down_proj")}
    table = jaccard_levels(mask_jaccard(random_masks(shapes, 0.5, 3), random_masks(shapes, 0.5, 4)))
    model_row = table[table.level == "model"].iloc[0]
    assert model_row.jaccard == pytest.approx(1 / 3, abs=0.005)  # ~1M weights: the standard error is ~0.0006
    assert random_mask_jaccard(0.5) == pytest.approx(1 / 3)
    assert random_mask_jaccard(0.5, 0.3) == pytest.approx(0.15 / 0.65)
    assert table[table.level == "layer"].layer.tolist() == [0, 1]  # layer parsed from the names without roles


def test_jaccard_of_identical_and_complementary_masks_and_the_pairwise_matrix():
    shapes = {"model.layers.0.self_attn.q_proj": (8, 16), "model.layers.1.self_attn.q_proj": (8, 16)}
    a = random_masks(shapes, 0.5, 5)
    complement = {name: ~mask for name, mask in a.items()}
    assert (jaccard_levels(mask_jaccard(a, a)).jaccard == 1).all()
    assert (jaccard_levels(mask_jaccard(a, complement)).jaccard == 0).all()
    pairwise = pairwise_jaccard({"a": a, "b": random_masks(shapes, 0.5, 6), "not-a": complement})
    assert len(pairwise[pairwise.level == "model"]) == 3  # every pair once
    matrix = jaccard_matrix(pairwise)
    assert list(matrix.index) == ["a", "b", "not-a"] and (matrix.values == matrix.values.T).all()
    assert matrix.loc["a", "a"] == 1 and matrix.loc["a", "not-a"] == 0
    layer0 = jaccard_matrix(pairwise, "layer", "layer 0")
    assert layer0.loc["a", "b"] == pairwise[(pairwise.name == "layer 0") & (pairwise.b == "b")].jaccard.item()


def test_jaccard_of_masks_from_different_models_raises():
    a = {"model.layers.0.mlp.up_proj": torch.zeros(4, 4, dtype=torch.bool)}
    with pytest.raises(MaskMismatchError, match="different linears"):
        mask_jaccard(a, {"model.layers.0.mlp.down_proj": torch.zeros(4, 4, dtype=torch.bool)})
    with pytest.raises(MaskMismatchError, match="differ in shape"):
        mask_jaccard(a, {"model.layers.0.mlp.up_proj": torch.zeros(4, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="at least two mask sets"):
        pairwise_jaccard({"a": a})


# ------------------------------------------------------------------------------------------------
# All or nothing: an interrupted prune marks the model, and later calls refuse it

RAISING = {"magnitude": "magnitude_mask", "wanda": "wanda_mask", "sparsegpt": "sparsegpt_prune"}


def fail_on_call(monkeypatch, function_name, call, error):
    """Make <function_name>, as prune() calls it (effllm.pruning.layerwise), raise ``error`` on its ``call``-th call
    (1-based)."""
    original, calls = getattr(pruning.layerwise, function_name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(pruning.layerwise, function_name, wrapper)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("Hessian")], ids=["ctrl-c", "error"])
@pytest.mark.parametrize("method", list(RAISING))
def test_interrupted_pruning_marks_the_model_and_later_calls_refuse_it(method, error, monkeypatch, tmp_path):
    model, _ = tiny_model("llama")  # 4 layers of 7 linears
    fail_on_call(monkeypatch, RAISING[method], 2 * 7 + 3, error)  # the third linear of layer 2
    with pytest.raises(type(error)):
        prune(model, method, 0.5, calibration=calibration_ids(), progress=False)
    monkeypatch.undo()
    zeros = [int((m.weight == 0).sum()) for i in range(4) for m in get_adapter(model).linears(i).values()]
    assert all(zeros[: 2 * 7]) and not any(zeros[2 * 7 + 2 :])  # layers 0-1 pruned, layer 2 in part, 3 not
    expected = f"pruning \\({method} unstructured, sparsity 0.5\\) was interrupted at layer 2 of 4.*{type(error).__name__}"
    from effllm.slicing import save_sliced, slice_model

    calls = {
        "prune": lambda: prune(model, method, 0.5, calibration=calibration_ids(), progress=False),
        "save_pruned": lambda: save_pruned(model, tmp_path / "pruned", masks={}),
        "slice_model": lambda: slice_model(model, calibration_ids(), mean=0.25),
        "save_sliced": lambda: save_sliced(model, tmp_path / "sliced"),
    }
    for name, call in calls.items():
        with pytest.raises(IncompleteModelError, match=expected + ".*partly pruned: reload it"):
            call()
        assert not (tmp_path / name.split("_")[-1]).exists()


def test_pruning_that_fails_before_any_weight_changes_leaves_the_model_usable(monkeypatch):
    model, _ = tiny_model("llama")
    before = snapshot(model)
    fail_on_call(monkeypatch, "wanda_mask", 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prune(model, "wanda", 0.5, calibration=calibration_ids(), progress=False)
    monkeypatch.undo()
    assert_unchanged(model, before)
    masks = prune(model, "wanda", 0.5, calibration=calibration_ids(), progress=False)  # not refused
    reference, _ = tiny_model("llama")
    expected = prune(reference, "wanda", 0.5, calibration=calibration_ids(), progress=False)
    assert all(torch.equal(masks[name], expected[name]) for name in expected)


# ------------------------------------------------------------------------------------------------
# Saved masks and pruned models: checksummed, bound to the model's weights, bytes 0/1


def mask_data_offset(path):
    """Where the tensor data of a safetensors file starts (8-byte header length, then the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_flipped_mask_bytes_are_refused(tmp_path):
    model, _ = tiny_model("llama")
    masks = prune(model, "magnitude", 0.5, progress=False)
    path = save_masks(masks, tmp_path / "masks.safetensors", model)
    data = bytearray(path.read_bytes())
    data[mask_data_offset(path) + 10] = 2  # a byte that safetensors would read as True
    path.write_bytes(bytes(data))
    with pytest.raises(io.ArtifactError, match="does not match the checksum"):
        load_masks(path, model)

    # the same bytes with a fresh checksum (written outside save_masks): still refused, by value
    name = next(iter(masks))
    corrupt = masks[name].clone()
    corrupt.view(torch.uint8)[0, 0] = 2
    io.save_tensors(tmp_path / "resealed.safetensors", {**masks, name: corrupt},
                    {"format": pruning.MASKS_FORMAT}, pruning.MASKS_KIND)
    with pytest.raises(MaskMismatchError, match="neither 0 nor 1"):
        load_masks(tmp_path / "resealed.safetensors")
    dense, _ = tiny_model("llama")
    before = snapshot(dense)
    with pytest.raises(MaskMismatchError, match="neither 0 nor 1"):
        apply_masks(dense, {**masks, name: corrupt})
    assert_unchanged(dense, before)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_masks_bind_to_the_weights_of_their_model_not_only_its_shapes(method, tmp_path):
    model, _ = tiny_model("llama")
    dense_fingerprint = fingerprint(model)
    masks = prune(model, method, 0.5, calibration=calibration_ids(), progress=False)
    assert fingerprint(model) == dense_fingerprint  # pruning leaves embeddings and norms alone
    path = save_masks(masks, tmp_path / "masks.safetensors", model)
    same_checkpoint, _ = tiny_model("llama")
    assert load_masks(path, same_checkpoint).keys() == masks.keys()
    other, _ = tiny_model("llama", seed=1)  # same architecture and shapes, other weights
    with pytest.raises(MaskMismatchError, match="computed on another model"):
        load_masks(path, other)
    with pytest.raises(MaskMismatchError, match="computed on another model"):
        load_masks(path, tiny_model("llama")[0].to(torch.bfloat16))


def test_saved_pruned_model_is_one_checksum_over_every_file(tmp_path):
    model, tokenizer = tiny_model("llama")
    prune(model, "magnitude", 0.5, progress=False)
    folder = save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer)
    sealed = json.loads((folder / io.SEAL_FILE).read_text())["files"]
    assert {"config.json", "model.safetensors", pruning.MASKS_FILE, pruning.MASKS_FILE + ".json",
            "tokenizer.json"} <= set(sealed)
    load_pruned(folder)  # intact

    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = 5.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(io.ArtifactError, match="config.json does not match the checksum"):
        load_pruned(folder)

    folder = save_pruned(model, tmp_path / "pruned")  # replaces its own earlier save
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(io.ArtifactError, match="holds files"):
        load_pruned(folder)
    (folder / io.SEAL_FILE).unlink()  # as a folder saved by an older effllm
    with pytest.raises(io.ArtifactError, match="missing"):
        load_pruned(folder)
    with pytest.raises(ValueError, match="already holds files that are not a saved effllm-pruned"):
        save_pruned(model, folder)  # would delete files it did not write
