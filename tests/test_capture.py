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
