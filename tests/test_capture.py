"""The layer-by-layer loop reproduces the model, and the capture hook sees each linear's real input."""

import pytest
import torch

from effllm.adapters import get_adapter
from effllm.capture import LayerByLayer, capture_inputs
from effllm.models import tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt", "gpt2"])
def test_layer_by_layer_reproduces_the_model(family):
    model, _ = tiny_model(family)
    ids = torch.randint(3, 250, (5, 12), generator=torch.Generator().manual_seed(0))
    runner = LayerByLayer(model, ids, batch_size=2)
    for i in range(runner.num_layers):
        runner.advance(i)
    logits = torch.cat([get_adapter(model).logits(h) for h in runner.states])
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_capture_sees_inputs_of_each_linear():
    model, _ = tiny_model("llama")
    adapter = get_adapter(model)
    ids = torch.randint(3, 250, (3, 10), generator=torch.Generator().manual_seed(1))
    runner = LayerByLayer(model, ids, batch_size=3)
    seen = {}
    with capture_inputs(adapter.linears(0), lambda name, x: seen.setdefault(name, x)):
        runner.run(0)
    q_name = next(n for n in seen if n.endswith("q_proj"))
    expected = adapter.norms(0)["attention"](runner.states[0])  # q_proj reads the normed layer input
    torch.testing.assert_close(seen[q_name], expected)
    assert len(seen) == 7
    # hooks are removed afterwards
    seen.clear()
    runner.run(0)
    assert not seen


def test_calibration_shape_is_checked():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="n_samples, seq_len"):
        LayerByLayer(model, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("ids, message", [
    (torch.ones(0, 16, dtype=torch.long), r"calibration \(token ids \[n_samples, seq_len\]\) must be \[batch >= 1, "
                                          r"length >= 1\]; got shape \(0, 16\)"),
    (torch.ones(3, 0, dtype=torch.long), r"got shape \(3, 0\)"),
    (torch.ones(2, 8), r"must hold integer token ids \(torch.long\); got dtype torch.float32"),
    (torch.tensor([[5, 900]]), r"holds ids 5..900, outside this model's vocabulary 0..383"),
])
def test_empty_float_and_out_of_vocabulary_calibration_is_refused(ids, message):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        LayerByLayer(model, ids)


@pytest.mark.parametrize("kind", ["disk", "cpu_offload"])
def test_fingerprint_of_offloaded_weights_equals_the_resident_model(kind, tmp_path):
    from effllm.models import fingerprint

    assert fingerprint(offloaded_model(kind, tmp_path)) == fingerprint(tiny_model("llama")[0])


# ---------------------------------------------------------------------------------------------------------
# Layers that live elsewhere: offloaded by accelerate (parameters on "meta"), moved to the compute device
# for their computation and back.

OFFLOADED = {  # layers 1 and 2 on disk (.dat files in the offload folder), the rest resident on the CPU
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu",
}


def offloaded_model(kind, tmp_path):
    """tiny-llama with its weights offloaded: 'disk' (a device_map through load_model) or 'cpu_offload'
    (accelerate.cpu_offload: every module's weights in a CPU dict, parameters on meta)."""
    from accelerate import cpu_offload

    from effllm.models import load_model

    if kind == "disk":
        model, _ = load_model("tiny-llama", device_map=OFFLOADED, offload_folder=tmp_path / "offload")
    else:
        model, _ = tiny_model("llama")
        cpu_offload(model, execution_device="cpu")
    assert get_adapter(model).attention(1).q_proj.weight.device.type == "meta"
    return model


def calibration(n=4, seq_len=16, seed=2):
    return torch.randint(3, 250, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["disk", "cpu_offload"])
def test_layer_by_layer_on_offloaded_layers_reproduces_the_model(kind, tmp_path):
    reference, _ = tiny_model("llama")
    model = offloaded_model(kind, tmp_path)
    ids = calibration()
    runner = LayerByLayer(model, ids, batch_size=3)
    for i in range(runner.num_layers):
        runner.run(i)
        assert get_adapter(model).attention(i).q_proj.weight.device.type == "cpu"  # on the compute device
        runner.advance(i)
    assert get_adapter(model).attention(1).q_proj.weight.device.type == "meta"  # back where it lives
    logits = torch.cat([get_adapter(model).logits(h) for h in runner.states])
    torch.testing.assert_close(logits, full_logits(reference, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["disk", "cpu_offload"])
@pytest.mark.parametrize(("method", "pattern"), [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_pruning_offloaded_layers_equals_the_resident_run(kind, method, pattern, tmp_path):
    from effllm.pruning import prune

    ids = calibration()
    reference, _ = tiny_model("llama")
    expected = prune(reference, method, 0.5, pattern, calibration=ids, progress=False)
    model = offloaded_model(kind, tmp_path)
    masks = prune(model, method, 0.5, pattern, calibration=ids, progress=False)
    assert masks.keys() == expected.keys()
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    adapter = get_adapter(model)
    assert adapter.attention(2).q_proj.weight.device.type == "meta"  # still offloaded
    # the pruned (and, for SparseGPT, updated) weights went back into the offload store
    torch.testing.assert_close(full_logits(model, ids), full_logits(reference, ids), rtol=1e-5, atol=1e-5)
    if kind == "disk":
        stored = adapter.attention(1).q_proj._hf_hook.weights_map["weight"]
        assert torch.equal(stored == 0, expected["model.layers.1.self_attn.q_proj"] | (stored == 0))
        assert (stored == 0).float().mean() >= 0.5


@pytest.mark.parametrize("kind", ["disk", "cpu_offload"])
def test_layer_scores_and_shortgpt_on_offloaded_layers(kind, tmp_path):
    from effllm.slicing import layer_scores, slice_model

    ids = calibration()
    reference, _ = tiny_model("llama")
    model = offloaded_model(kind, tmp_path)
    for score in ("lr", "bi"):
        torch.testing.assert_close(layer_scores(model, ids, kind=score), layer_scores(reference, ids, kind=score))
    slice_model(reference, ids, mean=0.5, method="shortgpt")
    slice_model(model, ids, mean=0.5, method="shortgpt")
    assert get_adapter(model).num_layers == get_adapter(reference).num_layers == 2
    torch.testing.assert_close(full_logits(model, ids), full_logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_exec_device_moves_resident_layers_there_and_back():
    """A CPU-resident layer is moved for its computation and back: the recorded homes and the
    Parameter objects (which methods hold on to) survive; a module added meanwhile goes home too."""
    from effllm.capture import use_exec_device

    model, _ = tiny_model("llama")
    adapter = get_adapter(model)
    q = adapter.attention(0).q_proj.weight
    with use_exec_device(model, "cpu"):
        runner = LayerByLayer(model, calibration())
    assert runner.exec_device == torch.device("cpu")
    runner.run(0)
    state = runner._onloaded
    assert state.layer == 0 and state.homes[(id(adapter.attention(0).q_proj), "weight")] == torch.device("cpu")
    adapter.layer(0).extra = torch.nn.Linear(2, 2)  # e.g. a SliceGPT shortcut added between run and advance
    runner.advance(0)
    assert runner._onloaded is None and adapter.attention(0).q_proj.weight is q
    assert adapter.layer(0).extra.weight.device.type == "cpu"
    with pytest.raises(ValueError, match="meta"):
        LayerByLayer(model, calibration(), exec_device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CPU-resident layers computed on it")
def test_wanda_on_cpu_resident_layers_computed_on_the_gpu():
    from effllm.capture import use_exec_device
    from effllm.pruning import prune

    ids = calibration()
    reference, _ = tiny_model("llama")
    expected = prune(reference, "wanda", 0.5, calibration=ids, progress=False)
    model, _ = tiny_model("llama")
    with use_exec_device(model, "cuda"):
        masks = prune(model, "wanda", 0.5, calibration=ids, progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())  # every layer went back
    agree = sum(int((masks[n] == expected[n]).sum()) for n in masks) / sum(m.numel() for m in masks.values())
    assert agree > 0.999  # GPU and CPU sums may order ties differently
